"""launch/ scripts (dry runs print the exact commands), the multi-process start-up plan, and a
real 2-process job on this host (jax.distributed over localhost, 2 fake CPU devices each)
that must match one process on 4 devices."""

import json
import os
import re
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from d2v_jax import distributed, watchdog
from reliability_utils import cpu_xla_flags, free_port
from step_utils import run_steps, tiny_text_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")


def _dry(script: str, *args: str, env: dict | None = None) -> list[str]:
  full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_"))}
  full_env.update(env or {})
  out = subprocess.run(["bash", os.path.join(LAUNCH, script), "--dry-run", *args], env=full_env,
                       capture_output=True, text=True, timeout=30)
  assert out.returncode == 0, out.stderr
  return out.stdout.splitlines()


def test_tpu_single_slice_dry_run():
  z = "--zone=us-west4-a"
  assert _dry("tpu.sh", "create", "--name", "d2v", "--zone", "us-west4-a", "--type", "v5litepod-16") == [
      f"+ gcloud compute tpus tpu-vm create d2v {z} --accelerator-type=v5litepod-16 "
      "--version=v2-alpha-tpuv5-lite"]
  setup = _dry("tpu.sh", "setup", "--name", "d2v", "--zone", "us-west4-a")
  assert setup[0] == f"+ git -C {ROOT} archive --format=tar.gz -o /tmp/d2v_jax-src.tar.gz HEAD"
  assert setup[1] == (f"+ gcloud compute tpus tpu-vm scp /tmp/d2v_jax-src.tar.gz "
                      f"d2v:d2v_jax-src.tar.gz {z} --worker=all")
  assert setup[2].startswith(f"+ gcloud compute tpus tpu-vm ssh d2v {z} --worker=all '--command=")
  assert ".venv/bin/pip install -q -r requirements.txt -r requirements-tpu.txt" in setup[2]
  assert len(setup) == 3

  run = _dry("tpu.sh", "run", "--name", "d2v", "--zone", "us-west4-a", "--workdir", "gs://b/runs/t",
             "--", "--config", "configs/text.py:variant=base", "--config.data.path=gs://b/t/*.txt")
  assert run == [
      f"+ gcloud compute tpus tpu-vm ssh d2v {z} --worker=all '--command=cd ~/d2v_jax; "
      "D2V_DISTRIBUTED=1 setsid nohup .venv/bin/python -m d2v_jax.train --workdir=gs://b/runs/t "
      "--config configs/text.py:variant=base '\\''--config.data.path=gs://b/t/*.txt'\\'' "
      "> train.log 2>&1 < /dev/null & echo $! > train.pid'"]
  assert _dry("tpu.sh", "stop", "--name", "d2v", "--zone", "us-west4-a") == [
      f"+ gcloud compute tpus tpu-vm ssh d2v {z} --worker=all '--command=kill -TERM "
      "$(cat ~/d2v_jax/train.pid) 2>/dev/null || echo '\\''no trainer running'\\'''"]
  assert _dry("tpu.sh", "delete", "--name", "d2v", "--zone", "us-west4-a", "--project", "p1") == [
      "+ gcloud compute tpus tpu-vm delete d2v --zone=us-west4-a --project=p1 --quiet"]


def test_tpu_multislice_dry_run():
  env = {"TPU_NAME": "ms", "TPU_ZONE": "us-east5-a"}
  assert _dry("tpu.sh", "create", "--type", "v5p-16", "--num-slices", "2", "--spot", env=env) == [
      "+ gcloud compute tpus queued-resources create ms --zone=us-east5-a --accelerator-type=v5p-16 "
      "--runtime-version=v2-alpha-tpuv5 --node-count=2 --node-prefix=ms --spot"]
  stop = _dry("tpu.sh", "stop", "--num-slices", "2", env=env)
  assert [line.split(" --zone")[0] for line in stop] == [
      "+ gcloud compute tpus tpu-vm ssh ms-0", "+ gcloud compute tpus tpu-vm ssh ms-1"]
  assert _dry("tpu.sh", "delete", "--num-slices", "2", env=env) == [
      "+ gcloud compute tpus queued-resources delete ms --zone=us-east5-a --force --quiet"]


def test_tpu_missing_option_is_one_clear_line():
  out = subprocess.run(["bash", os.path.join(LAUNCH, "tpu.sh"), "--dry-run", "run", "--name", "x",
                        "--zone", "z"], capture_output=True, text=True, timeout=30,
                       env={k: v for k, v in os.environ.items() if not k.startswith("TPU_")})
  assert out.returncode == 2
  assert out.stderr.strip() == ("error: --workdir is required (the run directory on shared "
                                "storage, e.g. gs://BUCKET/runs/NAME)")


def test_slurm_dry_run():
  env = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "gpu1,gpu2,gpu3,gpu4",
         "PYTHON": ".venv/bin/python", "PATH": "/usr/bin:/bin"}   # no scontrol on PATH
  lines = _dry("slurm.sbatch", "--workdir", "/shared/r", "--config", "configs/text.py:variant=base",
               env=env)
  assert lines == [
      f"+ srun --kill-on-bad-exit=1 --chdir={ROOT} bash -c 'exec .venv/bin/python -m d2v_jax.train "
      "--coordinator_address=gpu1:16242 --num_processes=4 --process_id=$SLURM_PROCID \"$@\"' d2v "
      "--workdir /shared/r --config configs/text.py:variant=base"]


def test_local_dry_run():
  py = os.path.join(ROOT, ".venv", "bin", "python")
  env = {"PYTHON": py}
  assert _dry("local.sh", "--", "--workdir", "w", "--config", "configs/text.py:variant=tiny", env=env) == [
      f"+ {py} -m d2v_jax.train --workdir w --config configs/text.py:variant=tiny"]
  assert _dry("local.sh", "--num-processes", "2", "--port", "5555", "--", "--workdir", "w",
              env=env) == [
      f"+ {py} -m d2v_jax.train --workdir w --coordinator_address=localhost:5555 "
      f"--num_processes=2 --process_id={i} &" for i in range(2)]


def test_distributed_plan():
  p = distributed.plan("h:1234", 4, 2, env={})
  assert p.mode == "explicit" and p.kwargs == dict(
      coordinator_address="h:1234", num_processes=4, process_id=2, cluster_detection_method="deactivate")
  with pytest.raises(ValueError, match="needs --num_processes and --process_id"):
    distributed.plan("h:1234", None, None, env={})
  with pytest.raises(ValueError, match=r"--process_id=4 must be in \[0, --num_processes=4\)"):
    distributed.plan("h:1234", 4, 4, env={})
  assert distributed.plan(env={}).mode == "none"
  assert distributed.plan("h:1", 2, 0, env={"D2V_DISTRIBUTED": "0"}).mode == "none"
  assert distributed.plan(env={"D2V_DISTRIBUTED": "1"}).mode == "auto"
  # SLURM: only inside a job step (srun), not in the batch script itself.
  slurm = {"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_ID": "7"}
  assert distributed.plan(env=slurm).mode == "none"
  step = dict(slurm, SLURM_STEP_ID="0", SLURM_STEP_TASKS_PER_NODE="1(x2)", SLURM_GPUS_ON_NODE="8")
  p = distributed.plan(env=step)
  assert p.mode == "slurm" and p.kwargs == {"local_device_ids": list(range(8))}
  p = distributed.plan(env=dict(step, SLURM_STEP_TASKS_PER_NODE="8(x2)", SLURM_NTASKS="16"))
  assert p.mode == "slurm" and p.kwargs == {}     # one task per GPU: JAX's SLURM_LOCALID default
  assert distributed.plan(env={"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}).mode == "tpu"
  assert distributed.plan(env={"TPU_WORKER_HOSTNAMES": "localhost"}).mode == "none"
  assert distributed._slurm_tasks_per_node({"SLURM_TASKS_PER_NODE": "4(x2),1"}) == [4, 4, 1]


WORKER = textwrap.dedent("""
    import argparse, json, sys
    sys.path[:0] = [{root!r}, {tests!r}]
    p = argparse.ArgumentParser()
    for f in ("--coordinator_address", "--out"):
      p.add_argument(f)
    p.add_argument("--num_processes", type=int)
    p.add_argument("--process_id", type=int)
    a = p.parse_args()
    from d2v_jax import distributed
    plan = distributed.initialize(a.coordinator_address, a.num_processes, a.process_id)
    import jax
    from d2v_jax import build as build_lib
    from d2v_jax.data import text as text_data
    from step_utils import tiny_text_config
    cfg = tiny_text_config()
    built = build_lib.build(cfg)                       # every device of every process
    full = text_data.example_batch(cfg, cfg.batch_size)
    n, i = cfg.batch_size // jax.process_count(), jax.process_index()
    local = {{k: v[i * n:(i + 1) * n] for k, v in full.items()}}   # this process's rows only
    state, out = built.init(cfg.seed), []
    for _ in range(2):
      state, m = built.step(state, build_lib.to_global(local, built.batch_shardings))
      jax.block_until_ready(state)
      out.append({{k: float(v) for k, v in jax.device_get(m).items()}})
    json.dump(dict(mode=plan.mode, processes=jax.process_count(), devices=jax.device_count(),
                   local=jax.local_device_count(), metrics=out), open(f"{{a.out}}.{{i}}.json", "w"))
""")


def test_two_processes_match_one(tmp_path):
  """launch/local.sh --num-processes 2: each process feeds half the batch (4 of 8 rows) to
  its 2 CPU devices; losses and parameter norms equal one process on 4 devices (1e-5)."""
  worker = tmp_path / "worker.py"
  worker.write_text(WORKER.format(root=ROOT, tests=os.path.join(ROOT, "tests")))
  # this process's XLA flags (conftest), so the 1e-5 comparison is like for like
  env = dict(os.environ, XLA_FLAGS=cpu_xla_flags(2), JAX_PLATFORMS="cpu", PYTHON=sys.executable)
  out = subprocess.run(
      ["bash", os.path.join(LAUNCH, "local.sh"), "--num-processes", "2", "--port", str(free_port()),
       "--", sys.executable, str(worker), f"--out={tmp_path / 'r'}"],
      env=env, capture_output=True, text=True, timeout=420, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  runs = [json.loads((tmp_path / f"r.{i}.json").read_text()) for i in range(2)]
  for r in runs:
    assert (r["mode"], r["processes"], r["devices"], r["local"]) == ("explicit", 2, 4, 2)
  _, single, _ = run_steps(tiny_text_config(), 2, devices=jax.devices()[:4])
  for r in runs:
    for a, b in zip(single, r["metrics"]):
      for k in ("loss", "grad_norm", "param_norm"):
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5)


def _plan_dry_run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  """python -m d2v_jax.distributed: the plan this environment gets (nothing initialised)."""
  clean = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TPU_", "D2V_", "MEGASCALE_"))}
  clean.update(env or {})
  return subprocess.run([sys.executable, "-m", "d2v_jax.distributed", *args], cwd=ROOT, env=clean,
                        capture_output=True, text=True, timeout=60)


def test_distributed_dry_run_prints_the_plan_of_each_environment():
  """The start-up the trainer runs (distributed.initialize) for every environment the module
  detects, as `python -m d2v_jax.distributed` prints it."""
  slurm = {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0",
           "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_GPUS_ON_NODE": "4"}
  cases = [
      ((), {}, "plan: none (single process); jax.distributed.initialize()"),
      (("--coordinator_address=h:1234", "--num_processes=2", "--process_id=1"), {},
       "plan: explicit (explicit coordinator h:1234, process 1/2); jax.distributed.initialize("
       "coordinator_address='h:1234', num_processes=2, process_id=1, "
       "cluster_detection_method='deactivate'); peer timeout 60 s"),
      ((), {"D2V_DISTRIBUTED": "1"},   # launch/tpu.sh sets it on every TPU VM worker
       "plan: auto (D2V_DISTRIBUTED=1: cluster detected by JAX); jax.distributed.initialize(); "
       "peer timeout 60 s"),
      ((), slurm, "plan: slurm (SLURM job step with 2 tasks); jax.distributed.initialize("
                  "local_device_ids=[0, 1, 2, 3]); peer timeout 60 s"),
      ((), {"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3", "D2V_PEER_TIMEOUT": "30"},
       "plan: tpu (TPU slice with 4 workers); jax.distributed.initialize(); peer timeout 30 s"),
      ((), {"MEGASCALE_COORDINATOR_ADDRESS": "m:8080"},
       "plan: tpu (multislice TPU job (MEGASCALE_COORDINATOR_ADDRESS)); "
       "jax.distributed.initialize(); peer timeout 60 s"),
      (("--coordinator_address=h:1", "--num_processes=2", "--process_id=0", "--peer_timeout=5"),
       {"D2V_DISTRIBUTED": "0"}, "plan: none (D2V_DISTRIBUTED=0); jax.distributed.initialize()"),
  ]
  for args, env, want in cases:
    out = _plan_dry_run(*args, env=env)
    assert (out.returncode, out.stdout.strip(), out.stderr) == (0, want, ""), (args, env)
  bad = _plan_dry_run(env={"D2V_PEER_TIMEOUT": "soon"})
  assert (bad.returncode, bad.stderr.strip()) == (
      2, "error: D2V_PEER_TIMEOUT='soon' must be a number of seconds")
  bad = _plan_dry_run("--coordinator_address=h:1", "--num_processes=2", "--process_id=2")
  assert (bad.returncode, bad.stderr.strip()) == (
      2, "error: --process_id=2 must be in [0, --num_processes=2)")


class _FakeClient:
  """The coordination service's key-value store, in memory; `down` makes every call fail."""

  def __init__(self):
    self.kv, self.down = {}, False

  def key_value_set(self, key, value, allow_overwrite=False):
    if self.down:
      raise RuntimeError("UNAVAILABLE: Socket closed")
    self.kv[key] = value

  def key_value_dir_get(self, prefix):
    if self.down:
      raise RuntimeError("UNAVAILABLE: Socket closed")
    return [(k, v) for k, v in self.kv.items() if k.startswith(prefix)]


def _watch(client, pid=0, nproc=3, timeout=1.0):
  wd = watchdog.Watchdog(client, pid, nproc, timeout, "h:1234")
  exited = []
  wd._exit = lambda code: exited.append((code, time.monotonic()))
  return wd, exited


@pytest.mark.serial   # wall-clock bounds of a 1 s peer timeout
def test_watchdog_names_a_silent_peer_within_the_timeout(capsys):
  """Peers 1 and 2 beat; peer 2 goes silent: process 0 names it (only it) between 1.0 and
  1.0 + 3 intervals (0.1 s each) after its last beat and exits 1."""
  client = _FakeClient()
  wd, exited = _watch(client)
  assert wd.interval == pytest.approx(0.2)   # timeout / 10, at least 0.2 s
  wd.step = 7
  wd.start()
  t0 = time.monotonic()
  silent_since = None
  while not exited and time.monotonic() - t0 < 10:
    n = int((time.monotonic() - t0) / 0.05)
    client.key_value_set("d2v/beat/1", f"{n} 9", allow_overwrite=True)
    if time.monotonic() - t0 < 1.0:
      client.key_value_set("d2v/beat/2", f"{n} 8", allow_overwrite=True)
    elif silent_since is None:
      silent_since = time.monotonic()
    time.sleep(0.05)
  assert exited and exited[0][0] == 1
  took = exited[0][1] - silent_since
  assert 1.0 - 0.25 <= took <= 1.0 + 3 * wd.interval, took
  err = capsys.readouterr().err.strip()
  assert re.fullmatch(r"error: process 2 stopped responding \(no heartbeat for 1 s, peer timeout "
                      r"1 s; its last step: 8\); process 0 stops too \(exit 1\)\. Finished "
                      r"checkpoints are intact: rerun the same command to resume from the "
                      r"latest", err), err
  assert client.kv["d2v/beat/0"].split()[1] == "7"    # our own beat carries our step
  assert wd.lost.is_set()


@pytest.mark.serial   # wall-clock bounds of a 1 s peer timeout
def test_watchdog_stops_at_once_on_a_failed_peer_ignores_a_finished_one_and_names_the_coordinator(
    capsys):
  client = _FakeClient()
  wd, exited = _watch(client, pid=1, nproc=3, timeout=5.0)
  client.kv.update({"d2v/beat/0": "done", "d2v/beat/2": "failed"})
  t0 = time.monotonic()
  wd.start()
  while not exited and time.monotonic() - t0 < 5:
    time.sleep(0.02)
  assert exited and exited[0][1] - t0 < 2 * wd.interval + 0.5   # no waiting for the timeout
  assert capsys.readouterr().err.startswith(
      "error: process 2 failed (see its log); process 1 stops too (exit 1).")

  client = _FakeClient()
  wd, exited = _watch(client, pid=2, nproc=3, timeout=2.0)
  wd.start()
  time.sleep(0.5)
  client.down = True                  # process 0, the coordination service's host, is gone
  while not exited and time.monotonic() - t0 < 10:
    time.sleep(0.02)
  assert exited and capsys.readouterr().err.startswith(
      "error: process 0 stopped responding (the coordination service at h:1234 is unreachable: "
      "UNAVAILABLE: Socket closed); process 2 stops too (exit 1).")

  # A clean end: the thread stops and the peers are told "done".
  client = _FakeClient()
  wd, exited = _watch(client, pid=1, nproc=2, timeout=1.0)
  wd.start()
  wd.finish()
  assert client.kv["d2v/beat/1"] == "done" and not wd._thread.is_alive() and not exited


@pytest.mark.serial   # wall-clock bounds of a 1 s peer timeout
def test_fail_tells_the_peers_and_exits_without_joining_jax_shutdown(monkeypatch, capsys):
  """A process of several that fails with an ordinary error publishes "failed" (its peers
  stop at once) and leaves with os._exit(code), not through JAX's shutdown barrier."""
  client = _FakeClient()
  wd, _ = _watch(client, pid=1, nproc=2, timeout=30.0)
  wd.start()
  codes = []
  monkeypatch.setattr(distributed.os, "_exit", codes.append)
  monkeypatch.setitem(watchdog._CURRENT, "watchdog", wd)
  t0 = time.monotonic()
  watchdog.fail("error: data.path matches no file", ValueError("no file"), code=2)
  assert codes == [2] and time.monotonic() - t0 < 3      # no waiting: not a lost peer
  assert client.kv["d2v/beat/1"] == "failed" and not wd._thread.is_alive()
  assert capsys.readouterr().err == "error: data.path matches no file\n"
  monkeypatch.setitem(watchdog._CURRENT, "watchdog", None)
  watchdog.fail("error: x")                           # one process: returns, nothing else
  assert codes == [2]
