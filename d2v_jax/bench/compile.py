"""Compile time of the train step per modality, size and dtype.

  python -m d2v_jax.bench compile [--modality text|vision|audio|all] [--sizes tiny,small]
      [--dtype float32|bfloat16|both] [--quick] [--out DIR]

For each problem (d2v_jax/bench/setups.py) in a fresh build: seconds to trace + lower the
jitted step to StableHLO, to compile it with XLA (persistent compilation cache off), the
number of HLO instructions after optimisation, and XLA's memory analysis of the compiled
program (argument / output / temporary bytes) where the backend reports it.
"""

from __future__ import annotations

import argparse
import time

import jax

from d2v_jax import bench
from d2v_jax import build as build_lib
from d2v_jax.bench import setups

COLUMNS = ["modality", "size", "dtype", "lower s", "compile s", "total s", "hlo instructions",
           "temp MB", "args MB"]


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--modality", default="all", help="text | vision | audio | all")
  p.add_argument("--sizes", default="tiny,small")
  p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | both")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--out", default="bench_results")


def measure(modality: str, size: str, dtype: str, batch_size: int,
            overrides: dict | None = None) -> dict:
  """A fresh build (not the benchmarks' shared one), so nothing is cached in-process."""
  cfg = setups.config(modality, size, dtype=dtype, batch_size=batch_size, overrides=overrides)
  built = build_lib.build(cfg, devices=jax.devices()[:1])
  state = built.init(cfg.seed)
  batch = build_lib.to_global(setups.batch(cfg), built.batch_shardings)
  t0 = time.perf_counter()
  lowered = built.step.lower(state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  text = compiled.as_text() or ""
  n_instr = sum(1 for line in text.splitlines() if " = " in line and not line.lstrip().startswith("//"))
  row = {"modality": modality, "size": size, "dtype": dtype, "batch": cfg.batch_size,
         "lower s": t1 - t0, "compile s": t2 - t1, "total s": t2 - t0, "hlo instructions": n_instr}
  try:
    mem = compiled.memory_analysis()
    row["temp MB"] = mem.temp_size_in_bytes / 2 ** 20
    row["args MB"] = mem.argument_size_in_bytes / 2 ** 20
  except Exception:  # noqa: BLE001 - not every backend reports it
    pass
  return row


def main(args: argparse.Namespace) -> int:
  jax.config.update("jax_enable_compilation_cache", False)
  rows, skipped = setups.for_each_problem(
      args, lambda m, size, dt, reps, batch, over: measure(m, size, dt, batch, over), "compile s")
  bench.report("compile", rows, COLUMNS, bench.out_path(args.out, "compile"), skipped=skipped,
               backend=jax.default_backend())
  return 0
