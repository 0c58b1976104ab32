"""Train-step time of our jitted step vs a PyTorch (Hugging Face) data2vec reference.

  python -m d2v_jax.bench step [--modality text|vision|audio|all] [--sizes tiny,small]
      [--dtype float32|bfloat16|both] [--reps 10] [--threads all|1] [--quick] [--out DIR]

Per (modality, size, dtype): both implementations start from the same weights (ours,
imported into the HF classes with d2v_jax/hf/<modality>.py) and train on the same batch
and masks (d2v_jax/bench/setups.py) with the same objective, EMA and AdamW
(d2v_jax/bench/torch_ref.py). After compilation and two warm-up steps each, `--reps` rounds
run ours and theirs interleaved; the table gives median wall ms per step, the interquartile
spread / median (noise), process CPU ms per step and ours/theirs for both. bfloat16: our
compute dtype bfloat16 (params, optimizer and EMA stay float32) against torch.autocast(cpu,
bfloat16). `--threads 1` pins the process to one core first (XLA and PyTorch each run one
thread): a kernel-for-kernel comparison that a loaded machine disturbs least.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import torch

from d2v_jax import bench
from d2v_jax.bench import setups, timing, torch_ref

COLUMNS = ["modality", "size", "dtype", "threads", "ours ms", "torch ms", "ours/torch",
           "ours noise", "torch noise", "ours cpu ms", "torch cpu ms", "cpu ours/torch",
           "loss ours", "loss torch", "audio s/s", "padded"]


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--modality", default="all", help="text | vision | audio | all")
  p.add_argument("--sizes", default="tiny,small")
  p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | both")
  p.add_argument("--reps", type=int, default=0, help="interleaved rounds (default 10, quick 2)")
  p.add_argument("--threads", default="all", choices=["all", "1"])
  p.add_argument("--batch-size", type=int, default=0, help="default 16 (quick: 4)")
  p.add_argument("--quick", action="store_true",
                 help="text tiny cut to 1 layer x 32 tokens, batch 4, 2 rounds (CI smoke)")
  p.add_argument("--out", default="bench_results")
  setups.add_set_arg(p)


def compare(modality: str, size: str, dtype: str, reps: int, batch_size: int,
            overrides: dict | None = None) -> dict:
  """One row: ours vs torch on the same weights, batch and masks."""

  s = setups.make(modality, size, dtype=dtype, batch_size=batch_size, overrides=overrides)
  ref = torch_ref.TorchData2Vec(s.cfg, jax.device_get(s.state.params), dtype=dtype)
  holder = {"state": s.state, "loss": None}

  def ours():
    holder["state"], m = s.built.step(holder["state"], s.global_batch)
    jax.block_until_ready((holder["state"], m))
    holder["loss"] = m["loss"]

  t0 = time.perf_counter()
  ours()
  compile_s = time.perf_counter() - t0
  loss_ours0 = float(holder["loss"])
  loss_torch0 = ref.step(s.batch)
  ours()
  ref.step(s.batch)
  res = timing.run_interleaved({"ours": ours, "torch": lambda: ref.step(s.batch)}, reps)
  o, t = res["ours"], res["torch"]
  ow, tw = timing.median(o["wall"]), timing.median(t["wall"])
  oc, tc = timing.median(o["cpu"]), timing.median(t["cpu"])
  audio = {}
  if modality == "audio":   # seconds of real (unpadded) audio trained per second of step time
    real = float(s.batch["audio_len"].sum())
    audio = {"audio s/s": real / s.cfg.data.sample_rate / ow,
             "padded": 1.0 - real / s.batch["audio"].size}
  return {**audio, "modality": modality, "size": size, "dtype": dtype,
          "threads": len(os.sched_getaffinity(0)), "batch": s.cfg.batch_size,
          "ours ms": 1e3 * ow, "torch ms": 1e3 * tw, "ours/torch": ow / tw,
          "ours noise": timing.spread(o["wall"]), "torch noise": timing.spread(t["wall"]),
          "ours cpu ms": 1e3 * oc, "torch cpu ms": 1e3 * tc, "cpu ours/torch": oc / tc,
          "loss ours": loss_ours0, "loss torch": loss_torch0, "compile s": compile_s,
          "ours wall s": o["wall"], "torch wall s": t["wall"]}


def main(args: argparse.Namespace) -> int:
  if args.threads == "1":
    timing.pin_to_one_core()
  torch.manual_seed(0)
  load0 = timing.load()

  def measure(m, size, dt, reps, batch, over):
    row = compare(m, size, dt, reps, batch, over)
    print(f"  {m} {size} {dt}: ours {row['ours ms']:.1f} ms, torch {row['torch ms']:.1f} ms, "
          f"ratio {row['ours/torch']:.2f}", flush=True)
    return row

  rows, skipped = setups.for_each_problem(args, measure, "ours/torch")
  bench.report("step", rows, COLUMNS, bench.out_path(args.out, "step"),
               reps=args.reps or (2 if args.quick else 10),
               load_before=load0, load_after=timing.load(), skipped=skipped,
               torch=torch.__version__, torch_threads=torch.get_num_threads())
  return 0
