"""Peak host memory (RSS high-water mark) of a tiny training run per modality.

  python -m d2v_jax.bench memory [--modality text|vision|audio|all] [--steps 20] [--quick]
      [--out DIR]

Each run is `python -m d2v_jax.train --config configs/<m>.py:variant=tiny,runlocal` (real
local data written by .ci/setup) in its own process for --steps steps, checkpointing at
the end (`--run train`, the default), or, with `--run step` (quick), a loop of the jitted
step on the benchmark's synthetic tiny batch (no data pipeline, no checkpoint). Each child
reports its own high-water mark (VmHWM), so runs do not see each other or the parent.
Alongside: the same for a process that only imports the stack (jax, flax, optax,
tensorflow, transformers' config), to separate the fixed cost from the run's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from d2v_jax import bench
from d2v_jax.bench import setups

COLUMNS = ["modality", "run", "steps", "peak RSS MB", "over imports MB", "wall s", "exit"]
BASELINE = ("import jax, flax, optax, orbax.checkpoint, tensorflow, numpy; "
            "import jax.numpy as jnp; jnp.ones(8).block_until_ready()")


STEP_CHILD = """
import json, sys, jax
from d2v_jax.bench import setups
s = setups.make(sys.argv[1], "tiny", batch_size=int(sys.argv[3]), overrides=json.loads(sys.argv[4]))
state = s.state
for _ in range(int(sys.argv[2])):
  state, m = s.built.step(state, s.global_batch)
  jax.block_until_ready((state, m))
"""


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--modality", default="all", help="text | vision | audio | all")
  p.add_argument("--steps", type=int, default=0, help="training steps (default 20, quick 2)")
  p.add_argument("--run", choices=["train", "step"], default="", help="default train (quick: step)")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--out", default="bench_results")


# Runs the command inside a wrapper that writes its own VmHWM (/proc/self/status) at exit:
# ru_maxrss of a child forked from a large parent (pytest, a notebook) starts at the
# parent's size, VmHWM belongs to the process's own address space after exec.
WRAPPER = """
import atexit, os, runpy, sys
def _report():
  with open('/proc/self/status') as f:
    kb = [l.split()[1] for l in f if l.startswith('VmHWM:')]
  with open(os.environ['D2V_MEM_OUT'], 'w') as f:
    f.write(kb[0] if kb else '0')
atexit.register(_report)
if sys.argv[1] == '-m':
  sys.argv = sys.argv[2:]
  runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
else:
  code, sys.argv = sys.argv[2], ['-c'] + sys.argv[3:]
  exec(compile(code, '<child>', 'exec'), {'__name__': '__main__'})
"""


class Child:
  """`python ARGS` (ARGS = ['-m', module, ...] or ['-c', code, ...]) under WRAPPER."""

  def __init__(self, args: list[str], env: dict, cwd: str):
    self._tmp = tempfile.TemporaryDirectory(prefix="d2v_mem_")
    self._out = os.path.join(self._tmp.name, "hwm")
    self._err = tempfile.TemporaryFile()
    self.t0 = time.perf_counter()
    self.proc = subprocess.Popen([sys.executable, "-c", WRAPPER, *args],
                                 env={**env, "D2V_MEM_OUT": self._out}, cwd=cwd,
                                 stdout=subprocess.DEVNULL, stderr=self._err)

  def result(self, timeout: float = 900) -> tuple[float, float, int, str]:
    """(peak RSS MB of the process, wall s, exit status, last stderr line)."""
    try:
      rc = self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      rc = self.proc.wait()
    secs = time.perf_counter() - self.t0
    kb = float(open(self._out).read() or 0) if os.path.exists(self._out) else float("nan")
    self._err.seek(0)
    lines = [ln for ln in self._err.read().decode(errors="replace").splitlines() if ln.strip()]
    self._err.close()
    self._tmp.cleanup()
    return kb / 1024, secs, rc, (lines[-1] if lines else "")


def main(args: argparse.Namespace) -> int:
  mods = ["text"] if args.quick else setups.modalities(args.modality)
  steps = args.steps or (2 if args.quick else 20)
  root = setups.repo_root()
  env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
  baseline = Child(["-c", BASELINE], env, root)   # runs beside the first run (memory is per process)
  run = args.run or ("step" if args.quick else "train")
  rows = []
  for m in mods:
    with tempfile.TemporaryDirectory(prefix=f"d2v_mem_{m}_") as workdir:
      if run == "train":
        cmd = ["-m", "d2v_jax.train", "--config",
               f"configs/{m}.py:variant=tiny,runlocal", "--workdir", workdir,
               f"--config.total_steps={steps}", f"--config.checkpoint_every={steps}",
               f"--config.log_every={max(steps // 2, 1)}"]
      else:
        over = setups.QUICK if args.quick and m == "text" else {}
        batch = setups.QUICK_BATCH if args.quick else setups.BATCH
        cmd = ["-c", STEP_CHILD, m, str(steps), str(batch), json.dumps(over)]
      mb, secs, rc, last = Child(cmd, env, root).result()
    row = {"modality": m, "run": run, "steps": steps, "peak RSS MB": mb, "wall s": secs, "exit": rc}
    if rc != 0:
      row["error"] = last[-200:]
    rows.append(row)
  base_mb, base_s, rc, _ = baseline.result()
  for row in rows:
    row["over imports MB"] = row["peak RSS MB"] - base_mb
  rows.insert(0, {"modality": "(imports only)", "run": "-", "steps": 0, "peak RSS MB": base_mb,
                  "wall s": base_s, "exit": rc})
  bench.report("memory", rows, COLUMNS, bench.out_path(args.out, "memory"))
  return 0 if all(r["exit"] == 0 for r in rows) else 1
