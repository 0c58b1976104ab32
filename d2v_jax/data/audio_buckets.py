"""Length buckets of data2vec-audio (module doc of d2v_jax/data/audio.py): which crop length
each clip gets, how many examples a bucket's batch holds, and which bucket and clips every step
draws (O(1) at any step, disjoint per process)."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import tensorflow as tf

from d2v_jax.config import ConfigError
from d2v_jax.data import order
from d2v_jax.data.audio_decode import clean_error, load_fn
from d2v_jax.data.audio_index import INDEX_CACHE, Progress, index, index_key, load_npz, num_examples, save_npz

_SCHED_SALT = 0x5C4ED    # which bucket each step draws from
_BUCKET_SALT = 0xB0C7E7  # + bucket: example order inside a bucket


def example_lengths(cfg, workdir: str | None = None) -> np.ndarray:
  """int64 [N]: samples (at data.sample_rate) of every indexed example. Files: from the index
  headers. Records: their index has no lengths, so every record is decoded once (progress
  line; cached in memory and in WORKDIR/audio_lengths_<key>.npz); only bucketing needs it."""
  idx = index(cfg, workdir)
  if idx["kind"] == "files":
    return idx["lengths"]
  key = index_key(cfg)
  if key + "/lengths" in INDEX_CACHE:
    return INDEX_CACHE[key + "/lengths"]
  path = os.path.join(workdir, f"audio_lengths_{key}.npz") if workdir else None
  cached = load_npz(path)
  if cached is None:
    load = load_fn(cfg, idx)
    n = num_examples(idx)
    ds = (tf.data.Dataset.range(n)
          .map(lambda i: tf.size(load(i)[0], out_type=tf.int64), num_parallel_calls=tf.data.AUTOTUNE,
               deterministic=True).batch(256))
    progress, chunks = Progress("audio lengths", n, "records"), []
    try:
      for chunk in ds.as_numpy_iterator():
        chunks.append(chunk)
        progress(sum(map(len, chunks)))
    except tf.errors.OpError as e:
      raise ConfigError(f"{clean_error(e)} (measuring record lengths for data.buckets)") from None
    progress.finish()
    cached = {"lengths": np.concatenate(chunks).astype(np.int64)}
    save_npz(path, cached)
  INDEX_CACHE[key + "/lengths"] = cached["lengths"]
  return cached["lengths"]


def bucketed(cfg) -> bool:
  return len(cfg.data.buckets) > 0


def crop_lengths(cfg) -> tuple[int, ...]:
  """Crop length (samples) of every bucket, ascending; the last is always data.max_samples
  (without buckets it is the only one, and shorter clips are padded to it)."""
  top = int(cfg.data.max_samples)
  return tuple(sorted({int(b) for b in cfg.data.buckets if 0 < int(b) < top} | {top}))


def batch_multiple(cfg) -> int:
  """What every bucket's global batch is a multiple of: data.batch_multiple, or (0) the
  number of devices, which every mesh's batch axes and the process count divide."""
  m = int(cfg.data.batch_multiple)
  return m if m > 0 else jax.device_count()


@dataclasses.dataclass(frozen=True)
class BucketPlan:
  """Which clips each bucket holds and its global batch (module docstring)."""
  crops: tuple[int, ...]       # crop length per bucket (samples), ascending
  batch: tuple[int, ...]       # global batch per bucket
  count: tuple[int, ...]       # clips per bucket
  per_epoch: tuple[int, ...]   # batches of each bucket per schedule epoch (0: bucket unused)
  members: np.ndarray          # int64 clip indices, grouped by bucket (bucket 0 first)
  bucket: np.ndarray           # int32 [N] bucket of every clip, -1 = left out (too short)
  padded: bool                 # no buckets: one crop length, shorter clips padded

  @property
  def offsets(self) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(self.count)]).astype(np.int64)

  @property
  def active(self) -> list[int]:
    return [k for k, n in enumerate(self.per_epoch) if n > 0]


def make_plan(lengths, crops, batch_size: int, multiple: int, *, padded: bool = False) -> BucketPlan:
  """Bucket assignment of clips of `lengths` samples for crop lengths `crops` (ascending; the
  last is the largest bucket, whose batch is batch_size). padded: a single crop length that
  takes every clip (shorter ones padded)."""
  lengths = np.asarray(lengths, np.int64)
  crops = tuple(int(c) for c in crops)
  nb, m = len(crops), int(multiple)
  if padded:
    if nb != 1:
      raise ValueError(f"padded batches have one crop length, got {crops}")
    bucket, batch = np.zeros(len(lengths), np.int32), (int(batch_size),)
  else:
    bucket = (np.searchsorted(np.asarray(crops), lengths, side="right") - 1).astype(np.int32)
    batch = tuple(int(batch_size) if k == nb - 1 else max(m, batch_size * crops[-1] // c // m * m)
                  for k, c in enumerate(crops))
    # A bucket with fewer clips than one batch would repeat clips inside its batches: its
    # clips join the next smaller bucket instead (cropped shorter). The smallest bucket then
    # gets a smaller batch (a multiple of m), or its clips are left out when under m, unless
    # it is the only bucket in use (order.py's wrap-around then applies).
    for k in range(nb - 1, 0, -1):
      here = bucket == k
      if 0 < here.sum() < batch[k]:
        bucket[here] = k - 1
    n0 = int((bucket == 0).sum())
    if 0 < n0 < batch[0] and (bucket > 0).any():
      if n0 >= m:
        batch = (n0 // m * m,) + batch[1:]
      else:
        bucket[bucket == 0] = -1
  count = tuple(int((bucket == k).sum()) for k in range(nb))
  per_epoch = tuple(max(1, int(np.floor(n / b + 0.5))) if n else 0 for n, b in zip(count, batch))
  members = np.concatenate([np.flatnonzero(bucket == k) for k in range(nb)]).astype(np.int64)
  return BucketPlan(crops, batch, count, per_epoch, members, bucket, padded)


def plan_stats(lengths, plan: BucketPlan) -> dict:
  """Shares of a plan when every kept clip is read equally often: padded_fraction = padding /
  all samples of the batches (~ padded frames / frames), cropped_fraction = audio the crops
  cut away / audio of the kept clips; left_out = clips in no bucket; shapes = batch shapes."""
  lengths = np.asarray(lengths, np.int64)
  keep = plan.bucket >= 0
  crop = np.asarray(plan.crops, np.int64)[plan.bucket[keep]]
  real = np.minimum(lengths[keep], crop)
  return {"padded_fraction": float(1 - real.sum() / max(crop.sum(), 1)),
          "cropped_fraction": float(1 - real.sum() / max(lengths[keep].sum(), 1)),
          "left_out": int((~keep).sum()), "shapes": len(plan.active)}


def bucket_plan(cfg, workdir: str | None = None) -> BucketPlan:
  """The plan of this config's data (index + lengths) and buckets."""
  idx = index(cfg, workdir)
  if not bucketed(cfg):
    return make_plan(np.zeros(num_examples(idx)), crop_lengths(cfg), cfg.batch_size, 1, padded=True)
  plan = make_plan(example_lengths(cfg, workdir), crop_lengths(cfg), cfg.batch_size, batch_multiple(cfg))
  if not plan.active:
    raise ConfigError(f"data.path={cfg.data.path!r}: no clip is as long as the smallest bucket "
                      f"(data.buckets -> {crop_lengths(cfg)} samples); lower the buckets")
  return plan


def step_fns(cfg, plan: BucketPlan, process_index: int, process_count: int):
  """TensorFlow functions of the step: bucket_of(step) -> int32 [] and ids(step) -> int64 [b]
  (this process's clips of global batch `step`); pure functions of (cfg.seed, step,
  process_index), O(1) at any step (module docstring)."""
  for k in plan.active:
    if plan.batch[k] % process_count:
      raise ConfigError(f"the global batch {plan.batch[k]} of bucket {plan.crops[k]} samples is not "
                        f"divisible by process_count={process_count}: set data.batch_multiple (and "
                        "batch_size) to a multiple of it")
  members = tf.constant(plan.members)
  offsets = plan.offsets
  active = plan.active
  if len(active) == 1:  # exactly order.py's order (the order of unbucketed runs)
    k = active[0]
    kw = dict(num_examples=plan.count[k], global_batch=plan.batch[k], seed=cfg.seed,
              process_index=process_index, process_count=process_count)
    return (lambda step: tf.constant(k, tf.int32),
            lambda step: tf.gather(members, offsets[k] + order.example_indices(step, **kw)))

  per_epoch = tf.constant(plan.per_epoch, tf.int64)
  ends = tf.constant(np.cumsum(plan.per_epoch), tf.int64)
  total = int(sum(plan.per_epoch))
  batch = tf.constant(plan.batch, tf.int64)
  count = tf.constant(plan.count, tf.int64)
  first = tf.constant(offsets[:-1], tf.int64)
  seed = tf.constant(cfg.seed, tf.int64)

  def slot(step):
    """(bucket, j): step is batch j of its bucket's stream. Schedule epoch e holds per_epoch[k]
    batches of bucket k, in a seeded order; they are batches e * per_epoch[k] + [0, per_epoch[k])."""
    step = tf.cast(step, tf.int64)
    epoch = step // total
    q = tf.raw_ops.RandomIndexShuffle(
        index=step % total, seed=tf.stack([seed, epoch, tf.constant(_SCHED_SALT, tf.int64)]),
        max_index=tf.constant(total - 1, tf.int64), rounds=4)
    k = tf.searchsorted(ends, q[None], side="right", out_type=tf.int64)[0]
    return k, epoch * per_epoch[k] + q - (ends[k] - per_epoch[k])

  def bucket_of(step):
    return tf.cast(slot(step)[0], tf.int32)

  def ids(step):
    # Batch j of bucket k is slice j mod q of pass j div q over a fresh permutation of its n
    # clips, q = n div b whole batches per pass: a batch never holds a clip twice (process
    # shards are disjoint); the n mod b clips a pass skips differ from pass to pass.
    k, j = slot(step)
    b = batch[k] // process_count
    n = count[k]
    q = n // batch[k]
    g = (j % q) * batch[k] + process_index * b + tf.range(b)
    seeds = tf.stack([tf.fill([b], seed), tf.fill([b], j // q), tf.fill([b], _BUCKET_SALT + k)], axis=1)
    local = tf.raw_ops.RandomIndexShuffle(index=g, seed=seeds, max_index=n - 1, rounds=4)
    return tf.gather(members, first[k] + local)

  return bucket_of, ids


def batch_indices(cfg, workdir: str | None, step: int, *, process_index: int = 0,
                  process_count: int = 1) -> tuple[int, np.ndarray]:
  """(crop length in samples, clip indices) of one process's share of batch `step`."""
  plan = bucket_plan(cfg, workdir)
  bucket_of, ids = step_fns(cfg, plan, process_index, process_count)
  return plan.crops[int(bucket_of(step))], ids(step).numpy()
