"""Shared set-up of the reliability tests (test_resume, test_guards, test_bad_input): a small
seeded text corpus with its tokenizer (trained once per session), one argv for the CLI and
in-process runs, and helpers to compare checkpoints and hash run directories."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
from absl import flags

from d2v_jax import build as build_lib, checkpoint, config as config_lib, metrics
from d2v_jax.data import text_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the", "lord", "said", "unto", "moses", "and", "they", "went", "into", "land", "of",
         "egypt", "bread", "water", "king", "house", "people", "day", "night", "light")


def write_corpus(path: str, lines: int = 600, seed: int = 0) -> str:
  """Seeded pseudo-sentences; blank lines end documents (files source)."""
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for i in range(lines):
      f.write(" ".join(rng.choice(WORDS, rng.integers(5, 15))) + ".\n")
      if i % 20 == 19:
        f.write("\n")
  return path


def text_setup(tmp_dir: str) -> dict:
  """Corpus, tokenizer and block cache shared by every run of a session."""
  corpus = write_corpus(os.path.join(tmp_dir, "corpus.txt"))
  tok = os.path.join(tmp_dir, "tokenizer")
  text_tokenizer.train_tokenizer(open(corpus).read().splitlines(), 300, tok)
  return {"corpus": corpus, "tokenizer": tok, "cache": os.path.join(tmp_dir, "cache")}


def text_args(setup: dict, **overrides) -> list[str]:
  """The training command's flags (without --workdir). Overrides: dotted key -> value."""
  keys = {"data.path": setup["corpus"], "data.tokenizer": setup["tokenizer"],
          "data.cache_dir": setup["cache"], "data.block_size": 32, "batch_size": 8,
          "total_steps": 8, "checkpoint_every": 4, "log_every": 1, "optim.warmup_steps": 2,
          "keep_checkpoints": 5, "scaling.reference_batch": 0}   # batch 8 as given: no rescaling
  keys.update(overrides)
  return ["--config", "configs/text.py:variant=tiny,runlocal"] + [
      f"--config.{k}={v}" for k, v in keys.items()]


def write_images(out_dir: str, n: int = 12, size: int = 48, seed: int = 0) -> str:
  """n PNG photos-like textures (stripes + noise), distinct per file."""
  from PIL import Image
  os.makedirs(out_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:size, 0:size]
  for i in range(n):
    a = np.stack([np.sin((x * (i % 4 + 1) + y * (i // 4)) / 5 + c) for c in range(3)], -1)
    a = a * 100 + 128 + rng.normal(0, 20, a.shape)
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(os.path.join(out_dir, f"{i:02d}.png"))
  return out_dir


def write_wavs(out_dir: str, n: int = 8, seconds: float = 1.0, rate: int = 16_000,
               seed: int = 0) -> str:
  """n mono 16-bit WAVs: a chirp plus noise, distinct per file. Returns the glob."""
  import wave
  os.makedirs(out_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * rate)) / rate
  for i in range(n):
    x = 0.5 * np.sin(2 * np.pi * (200 + 100 * i + 300 * t) * t) + 0.05 * rng.normal(size=t.shape)
    with wave.open(os.path.join(out_dir, f"{i:02d}.wav"), "wb") as w:
      w.setnchannels(1)
      w.setsampwidth(2)
      w.setframerate(rate)
      w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
  return os.path.join(out_dir, "*.wav")


# A short run of a tiny runlocal config: 4 steps, a checkpoint every 2, every step logged.
# The short runs give batch_size on the command line: scaling.reference_batch=0 keeps the
# runlocal recipe's lr / EMA as they are (no batch-size scaling, d2v_jax/scaling.py).
SHORT_RUN = {"batch_size": 8, "total_steps": 4, "checkpoint_every": 2, "log_every": 1,
             "keep_checkpoints": 5, "scaling.reference_batch": 0}


def _short_run_args(modality: str, data_keys: dict, overrides: dict) -> list[str]:
  # Audio's tri_stage schedule warms up for stage_ratios[0] x total_steps (here 1 step) and
  # rejects optim.warmup_steps, which only the cosine schedule reads.
  warmup = {} if modality == "audio" else {"optim.warmup_steps": 1}
  keys = {**data_keys, **SHORT_RUN, **warmup, **overrides}
  return ["--config", f"configs/{modality}.py:variant=tiny,runlocal"] + [
      f"--config.{k}={v}" for k, v in keys.items()]


def vision_args(image_dir: str, **overrides) -> list[str]:
  return _short_run_args("vision", {"data.path": image_dir, "model.image_size": 32,
                                    "data.min_mask_block": 4}, overrides)


def audio_args(wav_glob: str, **overrides) -> list[str]:
  return _short_run_args("audio", {"data.path": wav_glob, "data.max_samples": 16_000,
                                   "data.min_samples": 8_000}, overrides)


def parse(args: list[str]):
  """The ConfigDict the CLI builds from `args` (same parser, fresh flags). ml_collections
  reads the --config.* overrides from sys.argv, so it is swapped in while parsing."""
  from ml_collections import config_flags
  argv = ["d2v_jax.train"] + list(args)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file[:args]", flag_values=fv)
  saved, sys.argv = sys.argv, argv
  try:
    return config_lib.parse_argv(argv, fv).config
  finally:
    sys.argv = saved


def train_cmd(args: list[str], workdir: str) -> list[str]:
  return [sys.executable, "-m", "d2v_jax.train", *args, "--workdir", workdir]


def env(**extra) -> dict:
  """A trainer subprocess's environment: CPU, the repo importable, and tests/fault_site (its
  sitecustomize installs tests/faults.py when D2V_TEST_KILL is set)."""
  site = os.path.join(ROOT, "tests", "fault_site")
  e = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join([site, ROOT])}
  e.update({k: str(v) for k, v in extra.items()})
  return e


def run_cli(args: list[str], workdir: str, timeout: int = 300, **extra_env):
  return subprocess.run(train_cmd(args, workdir), cwd=ROOT, capture_output=True, text=True,
                        env=env(**extra_env), timeout=timeout)


def run_config(workdir: str):
  """The resolved config a run wrote (config.json)."""
  with open(os.path.join(workdir, "config.json")) as f:
    return config_lib.from_dict(json.load(f))


def load_state(workdir: str, mesh: dict | None = None, devices=None, step: int | None = None):
  """(state on host, meta) of a run's checkpoint, restored on `devices` with `mesh`
  (default: one CPU device)."""
  cfg = run_config(workdir)
  cfg.mesh.update(mesh or dict(data=-1, fsdp=1, tensor=1))
  built = build_lib.build(cfg, devices=devices or jax.devices()[:1])
  mngr = checkpoint.manager(workdir, async_save=False)
  try:
    state, meta = checkpoint.restore(mngr, built.abstract_state, built.state_shardings, step)
  finally:
    mngr.close()
  return jax.device_get(state), meta


def assert_states_equal(a, b) -> None:
  """Bitwise: step, student, teacher, optimizer state and rng."""
  for name in ("step", "params", "teacher", "opt_state", "rng"):
    la = jax.tree_util.tree_leaves(getattr(a, name))
    lb = jax.tree_util.tree_leaves(getattr(b, name))
    assert len(la) == len(lb), name
    for x, y in zip(la, lb):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


def step_losses(workdir: str) -> dict[int, float]:
  """step -> loss of the last row logged for that step (a resumed run re-logs some steps)."""
  return {r["step"]: r["loss"] for r in metrics.read(workdir)}


def tree_hashes(root: str) -> dict[str, str]:
  """sha256 of every file under `root` (relative paths)."""
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def wait_for_line(proc: subprocess.Popen, needle: str, timeout_lines: int = 10_000) -> list[str]:
  """Reads proc's stdout until a line contains `needle`; returns the lines read."""
  seen = []
  for _ in range(timeout_lines):
    line = proc.stdout.readline()
    if not line:
      break
    seen.append(line)
    if needle in line:
      return seen
  raise AssertionError(f"{needle!r} never printed; got:\n{''.join(seen[-30:])}")


SIGKILL_RC = -signal.SIGKILL


# --- several trainer processes on this host (tests/test_multiprocess.py) ----------------------

def cpu_xla_flags(devices: int) -> str:
  """This process's XLA_FLAGS (conftest: LLVM optimisation off) for a subprocess with
  `devices` fake CPU devices: its numbers compare like for like with this process's."""
  rest = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join([f"--xla_force_host_platform_device_count={devices}", *rest])


def free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


class Procs:
  """n trainer processes joined by jax.distributed on localhost (explicit flags, as
  launch/local.sh passes them), one fake CPU device each, each writing <log_dir>/<tag>.<i>.log.
  n == 1: a plain single process (no coordinator)."""

  def __init__(self, args: list[str], workdir: str, n: int, log_dir: str, tag: str,
               peer_timeout: float | None = None, env_for=None, devices: int = 1,
               extra_env: dict | None = None):
    self.n, self.logs, self.procs = n, [], []
    port = free_port()
    for i in range(n):
      cmd = train_cmd(args, workdir)
      if n > 1:
        cmd += [f"--coordinator_address=localhost:{port}", f"--num_processes={n}",
                f"--process_id={i}"]
      if peer_timeout is not None:
        cmd.append(f"--peer_timeout={peer_timeout}")
      extra = {"XLA_FLAGS": cpu_xla_flags(devices),
               **(extra_env or {}), **((env_for or (lambda _: {}))(i))}
      path = os.path.join(log_dir, f"{tag}.{i}.log")
      self.logs.append(path)
      with open(path, "w") as log:
        self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env(**extra), stdout=log,
                                           stderr=subprocess.STDOUT, text=True))

  def output(self, i: int) -> str:
    with open(self.logs[i]) as f:
      return f.read()

  def wait_for(self, i: int, needle: str, timeout: float = 600) -> None:
    """Until process i's log holds `needle` (fails if every process ended first)."""
    import time
    t0 = time.time()
    while needle not in self.output(i):
      if time.time() - t0 > timeout or all(p.poll() is not None for p in self.procs):
        raise AssertionError(f"{needle!r} never printed by process {i}:\n{self.output(i)[-3000:]}")
      time.sleep(0.05)

  def wait(self, timeout: float = 600) -> list[int]:
    try:
      return [p.wait(timeout=timeout) for p in self.procs]
    finally:
      self.kill()

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()
