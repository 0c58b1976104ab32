"""Host input pipeline throughput (read, gather, mask, batch) with tf.data on 1 core and all cores.

  python -m d2v_jax.bench input [--modality text|vision|audio|all] [--sizes small] [--quick]
      [--config SPEC ... | --production] [--no-step] [--out DIR]

Which configs: by default the step benchmark's problems (d2v_jax/bench/setups.py: the
modality's runlocal data and recipe at --sizes, batch 16), so the pipeline can be set next
to the train step at the same batch and shapes: "step examples/s" is batch / median time
of our jitted step on that config, and "input/step" says how many times faster the host
delivers than the step consumes (< 1: training is input-bound). --config specs (or
--production: the runlocal corpus at the production sequence shape, batch 256) measure the
pipeline alone unless --step is given.

Each config (--config, repeatable) is prepared once (timed), then its per-process pipeline
(`d2v_jax.data.<modality>.tf_dataset`) is drained for --repeats rounds of --batches batches
after a warm-up (the fastest round is reported, all rounds are in the JSON), once with
tf.data limited to one core (private_threadpool_size=1, max_intra_op_parallelism=1,
autotune cpu_budget=1) and once with every core. "tokens" are
the positions of the loss mask ([b, T]): text tokens, image patches, audio frames.
Audio adds "padded frames" (share of the conv frames of the batches that are padding; 0 with
length buckets) and "audio s/s" (seconds of real, unpadded audio delivered per second);
with buckets the batch shape varies, so "batch" and "positions" are means over the round.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
import tensorflow as tf

from d2v_jax import bench
from d2v_jax import build as build_lib
from d2v_jax import config as config_lib
from d2v_jax import modality as modality_lib
from d2v_jax.bench import setups, timing
from d2v_jax.data import audio
from d2v_jax.data.masking_audio import conv_output_length

# Default configs per modality: the local corpus of `runlocal` at the production sequence shape.
DEFAULTS = {
    "text": (["configs/text.py:variant=base,runlocal",
              "configs/text.py:variant=base,runlocal,masking=bert"],
             ["data.block_size=512"]),
}


COLUMNS = ["config", "cores", "batch", "positions", "examples/s", "tokens/s", "ms/batch",
           "step examples/s", "input/step", "padded frames", "audio s/s"]


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--modality", default="text", help="text | vision | audio | all")
  p.add_argument("--sizes", default="small", help="benchmark problem sizes (default mode)")
  p.add_argument("--production", action="store_true",
                 help="the modality's runlocal corpus at production shapes, batch 256")
  p.add_argument("--step", dest="step", action="store_true", default=None,
                 help="also time our train step on each config (default: on in default mode)")
  p.add_argument("--no-step", dest="step", action="store_false")
  p.add_argument("--step-reps", type=int, default=0, help="timed steps (default 5, quick 2)")
  p.add_argument("--config", action="append", default=None,
                 help="config spec (repeatable); default: the modality's runlocal config(s)")
  p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                 help="config override applied to every config, e.g. data.block_size=512")
  p.add_argument("--batch-size", type=int, default=0,
                 help="per-process batch (default: 16, --production 256, quick 8)")
  p.add_argument("--batches", type=int, default=0, help="batches per round (default 100, quick 20)")
  p.add_argument("--repeats", type=int, default=0,
                 help="timed rounds, the best is reported (default 3, quick 1)")
  p.add_argument("--quick", action="store_true", help="one config, few batches (CI smoke)")
  p.add_argument("--workdir", default="", help="tokenizer/cache dir (default /tmp/d2v_bench_<m>)")
  p.add_argument("--out", default="bench_results")


def _measure(ds, warmup: int, batches: int, repeats: int,
             on_batch=None) -> tuple[list[float], int, int]:
  """Seconds per round of `batches` batches (after `warmup`); examples and mask positions
  per batch (of the last one; audio: `on_batch(batch)` sees every timed batch). Rounds follow
  each other on one iterator; the fastest is the least disturbed by other processes on a
  shared machine."""
  it = ds.as_numpy_iterator()
  for _ in range(warmup):
    b = next(it)
  rounds = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(batches):
      b = next(it)
      if on_batch is not None:
        on_batch(b)
    rounds.append(time.perf_counter() - t0)
  return rounds, b["mask"].shape[0], b["mask"].size


def step_examples_per_s(cfg, reps: int, problem: tuple | None = None) -> tuple[float, float]:
  """(examples/s our jitted step consumes on cfg's shapes and batch, median step seconds).
  A benchmark problem's config reuses the step benchmarks' shared build."""
  if problem is not None:
    m, size, b, over = problem
    s = setups.make(m, size, batch_size=b, overrides=over)
    built, holder, batch = s.built, {"state": s.state}, s.global_batch
  else:
    built = build_lib.build(cfg, devices=jax.devices()[:1])
    holder = {"state": built.init(cfg.seed)}
    batch = build_lib.to_global(setups.batch(cfg), built.batch_shardings)

  def one():
    holder["state"], m = built.step(holder["state"], batch)
    jax.block_until_ready((holder["state"], m))

  one()
  one()
  secs = timing.median(timing.run_interleaved({"step": one}, reps)["step"]["wall"])
  return cfg.batch_size / secs, secs


def _configs(args, modality: str) -> tuple[list[tuple], list[str], bool]:
  """[(label, cfg, benchmark problem or None)], overrides to apply, whether to time the
  step by default."""
  sets = list(args.set or [])
  if args.config or args.production:
    fallback = ([f"configs/{modality}.py:variant=base,runlocal"], [])
    specs, default_sets = DEFAULTS.get(modality, fallback)
    specs = args.config or specs[:1 if args.quick else None]
    sets = ([] if args.config else default_sets) + sets
    out = []
    for spec in specs:
      cfg = config_lib.load_file(spec)
      cfg.batch_size = args.batch_size or (8 if args.quick else 256)
      out.append((spec.split("/")[-1], cfg, None))
    return out, sets, False
  sizes = ["tiny"] if args.quick else [x.strip() for x in args.sizes.split(",") if x.strip()]
  batch = args.batch_size or (setups.QUICK_BATCH if args.quick else setups.BATCH)
  over = setups.QUICK if args.quick and modality == "text" else None
  out = []
  for size in sizes:
    cfg = setups.config(modality, size, batch_size=batch, overrides=over)
    out.append((f"{modality} {size} (bench)", cfg, (modality, size, batch, over)))
  return out, sets, True


class BatchStats:
  """Running totals over audio batches: batches, examples, mask positions, real (unpadded)
  seconds, padded share of the conv frames (what the encoder computes on), batch shapes."""

  def __init__(self, cfg):
    self.cfg, self.real_samples, self.real_frames, self.frames = cfg, 0, 0, 0
    self.batches, self.examples, self.positions = 0, 0, 0
    self.shapes: set = set()

  def add(self, batch: dict) -> None:
    b, s = batch["audio"].shape
    m = self.cfg.model
    self.batches += 1
    self.examples += b
    self.positions += batch["mask"].size
    self.real_samples += int(batch["audio_len"].sum())
    self.real_frames += int(conv_output_length(batch["audio_len"].astype(np.int64), m.conv_kernels,
                                               m.conv_strides).sum())
    self.frames += b * audio.frames(self.cfg, s)
    self.shapes.add((b, s))

  @property
  def audio_seconds(self) -> float:
    return self.real_samples / self.cfg.data.sample_rate

  @property
  def padded_fraction(self) -> float:
    return 1.0 - self.real_frames / max(self.frames, 1)


def main(args: argparse.Namespace) -> int:


  mods = setups.modalities(args.modality)
  batches = args.batches or (20 if args.quick else 100)
  repeats = args.repeats or (1 if args.quick else 3)
  warmup = 3 if args.quick else 10
  step_reps = args.step_reps or (2 if args.quick else 5)
  rows, prep, all_sets = [], {}, {}
  for m in mods:
    mod = modality_lib.load(m)
    workdir = args.workdir or f"/tmp/d2v_bench_{m}"
    if not hasattr(mod.data, "tf_dataset"):
      raise SystemExit(f"d2v_jax.data.{m} has no tf_dataset(); the input benchmark needs "
                       "the tf.data pipeline to set its threading options")
    configs, sets, step_default = _configs(args, m)
    all_sets[m] = sets
    time_step = step_default if args.step is None else args.step
    for label, cfg, problem in configs:
      for item in sets:
        config_lib.apply_override(cfg, item)
      mod.data.validate(cfg)
      t0 = time.perf_counter()
      mod.data.prepare(cfg, workdir)
      prep[label] = round(time.perf_counter() - t0, 2)
      step_eps, step_s = (step_examples_per_s(cfg, step_reps, problem) if time_step
                          else (None, None))
      for core_label, cores in (("1", 1), ("all", os.cpu_count())):
        ds = mod.data.tf_dataset(cfg, workdir, start_step=0, process_index=0, process_count=1)
        opts = tf.data.Options()
        if cores == 1:
          opts.threading.private_threadpool_size = 1
          opts.threading.max_intra_op_parallelism = 1
          opts.autotune.cpu_budget = 1
        stats = BatchStats(cfg) if m == "audio" else None
        rounds, b, positions = _measure(ds.with_options(opts), warmup, batches, repeats,
                                        stats.add if stats else None)
        secs = min(rounds)
        if stats:  # audio: the shape varies with the bucket; means over all timed batches
          b, positions = stats.examples / stats.batches, stats.positions / stats.batches
        row = {"config": label, "cores": f"{core_label} ({cores})",
               "batch": b, "positions": positions // b,
               "examples/s": batches * b / secs, "tokens/s": batches * positions / secs,
               "ms/batch": 1e3 * secs / batches,
               "examples/s per round": [round(batches * b / r, 1) for r in rounds]}
        if stats:
          row.update({"positions": positions / b, "padded frames": stats.padded_fraction,
                      "audio s/s": stats.audio_seconds / stats.batches * batches / secs,
                      "batch shapes": [list(x) for x in sorted(stats.shapes)]})
        if step_eps:
          row.update({"step examples/s": step_eps, "input/step": row["examples/s"] / step_eps,
                      "step ms": 1e3 * step_s})
        rows.append(row)
  bench.report("input", rows, COLUMNS, bench.out_path(args.out, "input"),
               modality=args.modality, overrides=all_sets, batches=batches, repeats=repeats,
               warmup=warmup, prepare_s=prep)
  return 0
