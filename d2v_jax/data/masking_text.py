"""Token masking of fairseq's MaskTokensDataset, vectorised over a batch in TensorFlow.

Per row (docs/algorithm.md §2.1): n = number of maskable tokens (not <s>, </s>, <pad>);
starts = int(mask_prob * n / span + U[0, 1)) positions drawn uniformly without replacement
among the maskable ones; each start is extended to `span` tokens (overlaps allowed; a span
stops at the first special token or the sequence end). Of the selected positions a fraction
`leave_unmasked_prob` keeps its token, `random_token_prob` gets a uniform random non-special
token, the rest becomes <mask>. The loss covers only positions whose student token is
<mask> (fairseq selects targets with `src_tokens.eq(mask_idx)`, docs/algorithm.md §1.3).

Departures from fairseq, on purpose: fairseq draws starts among all positions (it can mask
<s>/</s>) and extends spans across them; here special tokens are never masked.

All randomness is stateless and derived from one [2] seed, so the same seed gives the same
mask eagerly and inside tf.data, on any host, at any resume point.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  mask_id: int
  special_ids: tuple[int, ...]     # never selected (<s>, </s>, <pad>)
  random_ids: tuple[int, ...]      # pool for random replacement (non-special tokens)
  mask_prob: float = 0.35
  span: int = 4
  random_token_prob: float = 0.0
  leave_unmasked_prob: float = 0.0

  @classmethod
  def from_config(cls, data_cfg, mask_id: int, special_ids: Sequence[int],
                  random_ids: Sequence[int]) -> "MaskSpec":
    return cls(mask_id=int(mask_id), special_ids=tuple(int(i) for i in special_ids),
               random_ids=tuple(int(i) for i in random_ids), mask_prob=float(data_cfg.mask_prob),
               span=int(data_cfg.span), random_token_prob=float(data_cfg.random_token_prob),
               leave_unmasked_prob=float(data_cfg.leave_unmasked_prob))


def mask_tokens(ids: tf.Tensor, seed: tf.Tensor, spec: MaskSpec) -> tuple[tf.Tensor, tf.Tensor]:
  """ids int [b, T], seed int [2] -> (student int32 [b, T], loss mask bool [b, T])."""
  ids = tf.cast(ids, tf.int32)
  shape = tf.shape(ids)
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=5)

  maskable = tf.reduce_all(
      ids[:, :, None] != tf.constant(spec.special_ids, tf.int32)[None, None, :], axis=-1)
  n = tf.reduce_sum(tf.cast(maskable, tf.float64), axis=1)
  # Float64 like fairseq's numpy, so int(...) rounds identically near integers.
  u = tf.random.stateless_uniform(shape[:1], seeds[0], dtype=tf.float64)
  num = tf.minimum(tf.floor(spec.mask_prob * n / spec.span + u), n)
  num = tf.cast(num, tf.int32)

  # Uniform choice without replacement: the `num` smallest of i.i.d. keys among maskable
  # positions. Float64 keys make ties (an extra start) vanishingly rare.
  keys = tf.random.stateless_uniform(shape, seeds[1], dtype=tf.float64)
  keys = tf.where(maskable, keys, 2.0)
  kth = tf.gather(tf.sort(keys, axis=1), tf.maximum(num - 1, 0)[:, None], batch_dims=1)
  start = maskable & (keys <= kth) & (num[:, None] > 0)

  selected, run = start, start
  for _ in range(spec.span - 1):
    # A span grows one token right per step and dies at the first special token.
    run = tf.pad(run[:, :-1], [[0, 0], [1, 0]]) & maskable
    selected = selected | run

  unmask = tf.zeros_like(selected)
  rand = tf.zeros_like(selected)
  p = spec.random_token_prob + spec.leave_unmasked_prob
  if p > 0:
    either = selected & (tf.random.stateless_uniform(shape, seeds[2]) < p)
    if spec.random_token_prob == 0:
      unmask = either
    elif spec.leave_unmasked_prob == 0:
      rand = either
    else:
      keep = tf.random.stateless_uniform(shape, seeds[3]) < spec.leave_unmasked_prob / p
      unmask, rand = either & keep, either & ~keep

  student = tf.where(selected & ~unmask, spec.mask_id, ids)
  if spec.random_token_prob > 0:
    pool = tf.constant(np.asarray(spec.random_ids, np.int32))
    pick = tf.random.stateless_uniform(shape, seeds[4], minval=0, maxval=len(spec.random_ids),
                                       dtype=tf.int32)
    student = tf.where(rand, tf.gather(pool, pick), student)
  return student, tf.equal(student, spec.mask_id)
