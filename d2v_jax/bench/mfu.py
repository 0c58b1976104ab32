"""Model FLOPs utilisation of the train step against a matmul peak measured in-process.

  python -m d2v_jax.bench mfu [--modality text|vision|audio|all] [--sizes tiny,small]
      [--dtype float32|bfloat16] [--reps 10] [--quick] [--out DIR]

Model FLOPs per step, two ways: analytic (d2v_jax/flops.py, the model the AOT compile
report uses: matmuls and convolutions only, a multiply-add = 2 FLOPs, teacher forward +
student forward + 2x the student forward for the backward), and XLA's HLO cost analysis of the
lowered step (every op, elementwise included). Peak: a jitted
N x N float32 matmul (N = 2048, quick 512) in the same process, timed interleaved with the
step so both see the same machine load. MFU = (FLOPs / step time) / peak, given from wall
time and from process CPU time (CPU-seconds: robust when other jobs share the cores).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from d2v_jax import bench
from d2v_jax import flops as flops_lib
from d2v_jax.bench import setups, timing

COLUMNS = ["modality", "size", "dtype", "GFLOP analytic", "GFLOP xla", "step ms",
           "GFLOP/s", "peak GFLOP/s", "MFU %", "MFU % (cpu time)", "MFU % xla"]


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--modality", default="all", help="text | vision | audio | all")
  p.add_argument("--sizes", default="tiny,small")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--reps", type=int, default=0, help="interleaved rounds (default 10, quick 2)")
  p.add_argument("--matmul", type=int, default=0, help="peak matmul size N (default 2048)")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--out", default="bench_results")
  setups.add_set_arg(p)


def xla_flops(lowered_or_compiled) -> float:
  """'flops' of XLA's HLO cost analysis (a Lowered: the unoptimised module, no compile)."""
  cost = lowered_or_compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def matmul_fn(n: int, dtype: str = "float32"):
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((n, n)), dtype)
  b = jnp.asarray(rng.standard_normal((n, n)), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  return lambda: f(a, b).block_until_ready(), 2.0 * n ** 3


def measure(modality: str, size: str, dtype: str, reps: int, n: int, batch_size: int,
            overrides: dict | None = None) -> dict:
  s = setups.make(modality, size, dtype=dtype, batch_size=batch_size, overrides=overrides)
  holder = {"state": s.state}

  def ours():
    holder["state"], m = s.built.step(holder["state"], s.global_batch)
    jax.block_until_ready((holder["state"], m))

  lowered = s.built.step.lower(s.state, s.global_batch)
  ours()
  ours()
  mm, mm_flops = matmul_fn(n)
  res = timing.run_interleaved({"step": ours, "matmul": mm}, reps)
  sw, sc = timing.median(res["step"]["wall"]), timing.median(res["step"]["cpu"])
  mw, mc = timing.median(res["matmul"]["wall"]), timing.median(res["matmul"]["cpu"])
  flops, xflops = flops_lib.model_flops(s.built, s.global_batch)[0]["total"], xla_flops(lowered)
  peak, peak_cpu = mm_flops / mw, mm_flops / mc
  return {"modality": modality, "size": size, "dtype": dtype, "batch": s.cfg.batch_size,
          "GFLOP analytic": flops / 1e9, "GFLOP xla": xflops / 1e9, "step ms": 1e3 * sw,
          "GFLOP/s": flops / sw / 1e9, "peak GFLOP/s": peak / 1e9,
          "MFU %": 100 * flops / sw / peak, "MFU % (cpu time)": 100 * (flops / sc) / peak_cpu,
          "MFU % xla": 100 * xflops / sw / peak, "step noise": timing.spread(res["step"]["wall"]),
          "matmul noise": timing.spread(res["matmul"]["wall"]), "matmul n": n,
          "peak GFLOP/cpu-s": peak_cpu / 1e9, "step cpu ms": 1e3 * sc}


def main(args: argparse.Namespace) -> int:
  n = args.matmul or (512 if args.quick else 2048)
  load0 = timing.load()
  rows, skipped = setups.for_each_problem(
      args, lambda m, size, dt, reps, batch, over: measure(m, size, dt, reps, n, batch, over),
      "MFU %")
  bench.report("mfu", rows, COLUMNS, bench.out_path(args.out, "mfu"),
               reps=args.reps or (2 if args.quick else 10), load_before=load0,
               load_after=timing.load(), skipped=skipped)
  return 0
