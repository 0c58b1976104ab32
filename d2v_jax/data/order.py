"""Example order: batch `step` of process `p` is a pure function of (seed, step, p).

Global example number g = step * B + p * b + j (B global batch, b = B // process_count,
j in [0, b)) is mapped to a dataset index through a seeded permutation of [0, N) that
changes every epoch (epoch = g // N). The permutation is `RandomIndexShuffle` (a stateless
bijection evaluated per element), so nothing is materialised: resuming at any step costs
O(1), every process reads a disjoint slice of the same global batch, and the processes
together read exactly what one process would. Modality-neutral (text, vision, audio).
"""

from __future__ import annotations

import tensorflow as tf

from d2v_jax.config import ConfigError

_ORDER_SALT = 0x0D2A0  # keeps the order stream apart from other users of cfg.seed


def per_process_batch(global_batch: int, process_count: int) -> int:
  """b = B // process_count; raises when B does not split evenly over the processes."""
  if process_count < 1 or global_batch % process_count:
    raise ConfigError(
        f"batch_size={global_batch} is not divisible by process_count={process_count}; "
        f"use a batch_size that is a multiple of {process_count}")
  return global_batch // process_count


def example_indices(step, *, num_examples: int, global_batch: int, seed: int,
                    process_index: int, process_count: int) -> tf.Tensor:
  """int64 [b] dataset indices of batch `step` (scalar tensor or int) for this process."""
  b = per_process_batch(global_batch, process_count)
  step = tf.cast(step, tf.int64)
  g = step * global_batch + process_index * b + tf.range(b, dtype=tf.int64)
  epoch = g // num_examples
  # One [3] seed per element (its epoch's permutation). tf.random.experimental.index_shuffle
  # mis-pads [n, 2] seeds in TF 2.21, so the raw op is called with [n, 3] directly.
  seeds = tf.stack([tf.fill([b], tf.constant(seed, tf.int64)), epoch,
                    tf.fill([b], tf.constant(_ORDER_SALT, tf.int64))], axis=1)
  return tf.raw_ops.RandomIndexShuffle(
      index=g % num_examples, seed=seeds,
      max_index=tf.constant(num_examples - 1, tf.int64), rounds=4)


def index_batches(num_examples: int, global_batch: int, *, seed: int, start_step: int,
                  process_index: int, process_count: int) -> tf.data.Dataset:
  """Infinite dataset of (step int64 [], indices int64 [b]) from `start_step` on."""
  if num_examples < 1:
    raise ValueError(f"num_examples={num_examples} must be >= 1")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
  per_process_batch(global_batch, process_count)
  kw = dict(num_examples=num_examples, global_batch=global_batch, seed=seed,
            process_index=process_index, process_count=process_count)
  return tf.data.Dataset.counter(start_step, dtype=tf.int64).map(
      lambda s: (s, example_indices(s, **kw)))


def batch_seed(seed: int, step, process_index: int, salt: int) -> tf.Tensor:
  """int64 [2] seed for the stateless random ops (masks) of one per-process batch."""
  s = tf.constant([seed, salt], tf.int64)
  s = tf.random.experimental.stateless_fold_in(s, tf.cast(step, tf.int64))
  return tf.random.experimental.stateless_fold_in(s, tf.constant(process_index, tf.int64))
