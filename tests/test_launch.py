"""launch/ scripts (dry runs print the exact commands), the multi-process start-up plan, and a
real 2-process job on this host (jax.distributed over localhost, 2 fake CPU devices each)
that must match one process on 4 devices."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from d2v_jax import distributed
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
    plan = distributed.maybe_initialize(a.coordinator_address, a.num_processes, a.process_id)
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


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  """launch/local.sh --num-processes 2: each process feeds half the batch (4 of 8 rows) to
  its 2 CPU devices; losses and parameter norms equal one process on 4 devices (1e-5)."""
  worker = tmp_path / "worker.py"
  worker.write_text(WORKER.format(root=ROOT, tests=os.path.join(ROOT, "tests")))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
             PYTHON=sys.executable)
  out = subprocess.run(
      ["bash", os.path.join(LAUNCH, "local.sh"), "--num-processes", "2", "--port", str(_free_port()),
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
