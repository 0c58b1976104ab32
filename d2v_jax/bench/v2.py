"""data2vec 1.0 vs 2.0 on the same encoder and batch: FLOPs and time per masked token.

  python -m d2v_jax.bench v2 [--quick] [--modality text|vision|audio|all] [--base-reps N] [--out DIR]

For each modality, the v1 and the v2 recipe of one encoder size (configs/<m>.py, `v2` adds
the data2vec 2.0 objective): the training step's dot / conv FLOPs from its traced program
(forward + backward + teacher; no compile needed, so the base configs at production lengths
are counted exactly), per example, per masked view (v1: 1, v2: M clones) and per masked token
(a prediction target: the learning signal the compute buys), and the measured time of a few
of those base steps (batch 2; --base-reps, 0 to skip: minutes per modality on a CPU); then,
for a small size that a CPU runs in seconds (tiny; --quick: 1 layer, no base timing), the
compiled step's time per masked token and XLA's temporary bytes. It ends with one line per
modality: `<modality>: v2 uses <X.X>x fewer FLOPs per masked token than v1` and, when the
base steps were timed, `... and <Y.Y>x less time per masked token at base size`.
"""

from __future__ import annotations

import argparse
import os

import flax.linen as nn
import jax
import numpy as np

from d2v_jax import bench, sharding
from d2v_jax import build as build_lib
from d2v_jax import config as config_lib
from d2v_jax import flops as flops_lib
from d2v_jax.bench import setups, timing

COLUMNS = ["modality", "objective", "size", "batch", "views", "masked/example", "GFLOP/example",
           "GFLOP/view", "MFLOP/masked token", "ms/step", "us/masked token", "temp MB"]
FLOP_SIZE = "base"
TIME_SIZE = "tiny"
TEXT_VOCAB = 50265


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--modality", default="all", help="text | vision | audio | all")
  p.add_argument("--quick", action="store_true", help="1-layer timing models, 2 repetitions")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--base-reps", type=int, default=3,
                 help="timed steps of the base configs (batch 2); 0: FLOPs only")
  p.add_argument("--out", default="bench_results")


def _config(modality: str, size: str, v2: bool, batch: int, quick: bool = False):
  cwd = os.getcwd()
  os.chdir(setups.repo_root())
  try:
    cfg = config_lib.load_file(f"configs/{modality}.py:variant={size}" + (",v2" if v2 else ""))
  finally:
    os.chdir(cwd)
  cfg.batch_size = batch
  cfg.dtype = "float32"   # the base recipes compute in bf16 on accelerators; XLA:CPU emulates it
  if modality == "text":
    cfg.model.vocab_size = TEXT_VOCAB
  if quick:
    cfg.model.encoder.num_layers = 1
    cfg.target.top_k = 1
  return cfg


def _masked_tokens(batch: dict) -> float:
  return float(np.asarray(batch["mask"]).sum())


def measure(modality: str, size: str, v2: bool, batch: int, *, time_it: bool, reps: int,
            quick: bool = False) -> dict:
  cfg = _config(modality, size, v2, batch, quick)
  built = build_lib.build(cfg, devices=jax.devices()[:1])
  host = setups.batch(cfg)   # real generator masks (at the largest crop)
  views = int(host["mask"].shape[1]) if v2 else 1
  masked = _masked_tokens(host) / batch
  row = {"modality": modality, "objective": "v2" if v2 else "v1", "size": size, "batch": batch,
         "views": views, "masked/example": masked}
  with nn.logical_axis_rules(sharding.RULES), jax.set_mesh(built.mesh):
    jaxpr = jax.make_jaxpr(built.step_fn)(built.abstract_state, host).jaxpr
  flops = flops_lib.matmul_flops(jaxpr, True) / batch
  row.update({"GFLOP/example": flops / 1e9, "GFLOP/view": flops / views / 1e9,
              "MFLOP/masked token": flops / masked / 1e6, "flops_per_masked": flops / masked})
  if time_it:
    state = built.init(cfg.seed)
    gb = build_lib.to_global(host, built.batch_shardings)
    compiled = built.step.lower(state, gb).compile()
    try:
      row["temp MB"] = compiled.memory_analysis().temp_size_in_bytes / 2 ** 20
    except Exception:  # noqa: BLE001 - not every backend reports it
      pass
    holder = {"state": state}

    def one():
      holder["state"], m = built.step(holder["state"], gb)
      jax.block_until_ready(m)
    one()  # warm-up (compile)
    times = timing.run_interleaved({"step": one}, reps)["step"]["wall"]
    sec = timing.median(times)
    row.update({"ms/step": sec * 1e3, "us/masked token": sec / (masked * batch) * 1e6})
  return row


def main(args: argparse.Namespace) -> int:
  rows, ratios, time_ratios = [], {}, {}
  reps = 2 if args.quick else args.reps
  base_reps = 0 if args.quick else args.base_reps
  for modality in setups.modalities(args.modality):
    pair, timed = {}, {}
    for v2 in (False, True):
      flop_row = measure(modality, FLOP_SIZE, v2, 2, time_it=base_reps > 0, reps=base_reps)
      time_row = measure(modality, TIME_SIZE, v2, 8, time_it=True, reps=reps, quick=args.quick)
      rows += [flop_row, time_row]
      pair[v2] = flop_row["flops_per_masked"]
      timed[v2] = flop_row.get("us/masked token")
    ratios[modality] = pair[False] / pair[True]
    if timed[False] and timed[True]:
      time_ratios[modality] = timed[False] / timed[True]
  bench.report("v2", rows, COLUMNS, bench.out_path(args.out, "v2"), backend=jax.default_backend(),
               ratios=ratios, time_ratios=time_ratios)
  for modality, r in ratios.items():
    t = time_ratios.get(modality)
    print(f"{modality}: v2 uses {r:.1f}x fewer FLOPs per masked token than v1"
          + (f" and {t:.1f}x less time per masked token at base size ({jax.default_backend()})"
             if t else ""))
  return 0


if __name__ == "__main__":   # pragma: no cover
  raise SystemExit("run: python -m d2v_jax.bench v2")
