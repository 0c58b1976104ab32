"""Host input pipeline throughput (read, gather, mask, batch) with tf.data on 1 core and all cores.

  python -m d2v_jax.bench input --modality text [--quick] [--out bench_results/input.json]

Each config (--config, repeatable) is prepared once (timed), then its per-process pipeline
(`d2v_jax.data.<modality>.tf_dataset`) is drained for --repeats rounds of --batches batches
after a warm-up (the fastest round is reported, all rounds are in the JSON), once with
tf.data limited to one core (private_threadpool_size=1, max_intra_op_parallelism=1,
autotune cpu_budget=1) and once with every core. "tokens" are
the positions of the loss mask ([b, T]): text tokens, image patches, audio frames.
"""

from __future__ import annotations

import argparse
import os
import time

from d2v_jax import bench

# Default configs per modality: the local corpus of `runlocal` at the production sequence shape.
DEFAULTS = {
    "text": (["configs/text.py:variant=base,runlocal",
              "configs/text.py:variant=base,runlocal,masking=bert"],
             ["data.block_size=512"]),
}


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--modality", default="text")
  p.add_argument("--config", action="append", default=None,
                 help="config spec (repeatable); default: the modality's runlocal config(s)")
  p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                 help="config override applied to every config, e.g. data.block_size=512")
  p.add_argument("--batch-size", type=int, default=256, help="per-process batch")
  p.add_argument("--batches", type=int, default=0, help="batches per round (default 100, quick 20)")
  p.add_argument("--repeats", type=int, default=0,
                 help="timed rounds, the best is reported (default 3, quick 1)")
  p.add_argument("--quick", action="store_true", help="one config, few batches (CI smoke)")
  p.add_argument("--workdir", default="", help="tokenizer/cache dir (default /tmp/d2v_bench_<m>)")
  p.add_argument("--out", default="bench_results/input.json")


def _override(cfg, item: str) -> None:
  from d2v_jax.config import ConfigError
  key, eq, value = item.partition("=")
  *parents, leaf = key.split(".")
  node = cfg
  for k in parents:
    node = node[k]
  if not eq or leaf not in node:
    raise ConfigError(f"--set {item!r}: expected KEY=VALUE with an existing key")
  old = node[leaf]
  if isinstance(old, bool):
    node[leaf] = value.lower() in ("1", "true", "yes")
  elif old is None:
    node[leaf] = value
  else:
    node[leaf] = type(old)(value)


def _measure(ds, warmup: int, batches: int, repeats: int) -> tuple[list[float], int, int, int]:
  """Seconds per round of `batches` batches (after `warmup`); examples and mask positions
  per batch; audio samples read in all rounds (0 for other modalities). Rounds follow each other on one iterator; the fastest is the least disturbed
  by other processes on a shared machine."""
  it = ds.as_numpy_iterator()
  for _ in range(warmup):
    b = next(it)
  rounds, samples = [], 0
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(batches):
      b = next(it)
      samples += int(b["audio_len"].sum()) if "audio_len" in b else 0  # real (unpadded) audio
    rounds.append(time.perf_counter() - t0)
  return rounds, b["mask"].shape[0], b["mask"].size, samples


def main(args: argparse.Namespace) -> int:
  import tensorflow as tf

  from d2v_jax import config as config_lib
  from d2v_jax import modality as modality_lib

  mod = modality_lib.load(args.modality)
  fallback = ([f"configs/{args.modality}.py:variant=base,runlocal"], [])
  specs, sets = DEFAULTS.get(args.modality, fallback)
  specs = args.config or specs[:1 if args.quick else None]
  sets = sets + (args.set or [])
  batches = args.batches or (20 if args.quick else 100)
  repeats = args.repeats or (1 if args.quick else 3)
  warmup = 3 if args.quick else 10
  workdir = args.workdir or f"/tmp/d2v_bench_{args.modality}"
  if not hasattr(mod.data, "tf_dataset"):
    raise SystemExit(f"d2v_jax.data.{args.modality} has no tf_dataset(); the input benchmark needs "
                     "the tf.data pipeline to set its threading options")

  rows, prep = [], {}
  for spec in specs:
    cfg = config_lib.load_file(spec)
    for item in sets:
      _override(cfg, item)
    cfg.batch_size = args.batch_size
    mod.data.validate(cfg)
    t0 = time.perf_counter()
    mod.data.prepare(cfg, workdir)
    prep[spec] = round(time.perf_counter() - t0, 2)
    for label, cores in (("1", 1), ("all", os.cpu_count())):
      ds = mod.data.tf_dataset(cfg, workdir, start_step=0, process_index=0, process_count=1)
      opts = tf.data.Options()
      if cores == 1:
        opts.threading.private_threadpool_size = 1
        opts.threading.max_intra_op_parallelism = 1
        opts.autotune.cpu_budget = 1
      rounds, b, positions, samples = _measure(ds.with_options(opts), warmup, batches, repeats)
      secs = min(rounds)
      audio = {"audio s/s": samples / cfg.data.sample_rate / sum(rounds)} if samples else {}
      rows.append({"config": spec.split("/")[-1], "cores": f"{label} ({cores})",
                   "batch": b, "positions": positions // b,
                   "examples/s": batches * b / secs, "tokens/s": batches * positions / secs,
                   "ms/batch": 1e3 * secs / batches,
                   "examples/s per round": [round(batches * b / r, 1) for r in rounds], **audio})
  columns = ["config", "cores", "batch", "positions", "examples/s", "tokens/s", "ms/batch"]
  bench.report("input", rows, columns + (["audio s/s"] if rows and "audio s/s" in rows[0] else []),
               args.out,
               modality=args.modality, overrides=sets, batches=batches, repeats=repeats,
               warmup=warmup,
               prepare_s=prep)
  return 0
