"""data2vec 2.0 masks, vectorised over a batch in TensorFlow (docs/algorithm.md §3.4, §3.9).

Every generator returns M masks per example with an EXACT number of masked positions per
row, so the student's visible-only gather has a static size K (the batch carries the
visible indices, "visible" int32 [b, M, K], next to "mask" bool [b, M, T]):

  vision  inverse block masking on the patch grid (fairseq `compute_block_mask_2d`):
          int(L * ((1 - R) + A) / B^2) random block centres (duplicates possible), a B x B
          block (clamped at the borders) around each marks patches to KEEP, then random
          patches are added / removed until exactly int(L * (1 - R)) are kept.
  text    uniformly random: int(L * (1 - R)) kept positions (MAE `random_masking`).
  audio   1-D block masks with an exact masked count (d2v_jax/data/masking_audio.py).

All randomness is stateless and derived from one [2] seed, so the same seed gives the same
masks eagerly and inside tf.data, on any host, at any resume point.
"""

from __future__ import annotations

import tensorflow as tf


def num_kept(length: int, mask_prob: float) -> int:
  """Visible positions per row for vision / text (fairseq: int(L * (1 - R)))."""
  return int(length * (1.0 - mask_prob))


def visible_indices(mask: tf.Tensor, num_visible: int) -> tf.Tensor:
  """mask bool [..., T] with exactly T - num_visible True per row -> int32 [..., num_visible]
  ascending indices of the unmasked positions (a stable argsort puts them first, in order)."""
  order = tf.argsort(tf.cast(mask, tf.int32), axis=-1, stable=True)
  return tf.cast(order[..., :num_visible], tf.int32)


def _exact_count(keep: tf.Tensor, target: int, seed: tf.Tensor) -> tf.Tensor:
  """keep bool [N, T] -> bool [N, T] with exactly `target` True per row: random positions are
  added (when short) or removed (when over), as fairseq's require_same_masks does."""
  u = tf.random.stateless_uniform(tf.shape(keep), seed, dtype=tf.float32)
  # Rank keys: kept positions first (in random order), then the others (in random order).
  key = tf.where(keep, u, u + 2.0)
  rank = tf.argsort(tf.argsort(key, axis=-1, stable=True), axis=-1, stable=True)
  return rank < target


def random_mask(seed: tf.Tensor, batch: int, clones: int, length: int,
                mask_prob: float) -> tf.Tensor:
  """Text: bool [batch, clones, length], exactly length - num_kept(length, R) True per row."""
  keep = num_kept(length, mask_prob)
  u = tf.random.stateless_uniform([batch * clones, length], seed, dtype=tf.float32)
  rank = tf.argsort(tf.argsort(u, axis=-1, stable=True), axis=-1, stable=True)
  return tf.reshape(rank >= keep, [batch, clones, length])


def inverse_block_mask_2d(seed: tf.Tensor, batch: int, clones: int, grid: int, *,
                          mask_prob: float, adjust: float, block: int) -> tf.Tensor:
  """Vision: bool [batch, clones, grid * grid] (row-major patches), True = masked, with
  exactly grid^2 - num_kept(grid^2, R) masked per row (module docstring)."""
  n = batch * clones
  length = grid * grid
  keep_target = num_kept(length, mask_prob)
  centres = int(length * (((1.0 - mask_prob) + adjust) / (block * block)))
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2)
  keep = tf.zeros([n, grid, grid], tf.bool)
  if centres > 0:
    c = tf.random.stateless_uniform([n, centres], seeds[0], minval=0, maxval=length, dtype=tf.int32)
    cy, cx = c // grid, c % grid                                  # [n, centres]
    # fairseq: offsets -(B // 2) .. B - B // 2 - 1 around the centre, clamped to the grid.
    lo = -(block // 2)
    yy = tf.range(grid)[None, None, :]
    y0 = tf.clip_by_value(cy + lo, 0, grid - 1)[..., None]
    y1 = tf.clip_by_value(cy + lo + block - 1, 0, grid - 1)[..., None]
    x0 = tf.clip_by_value(cx + lo, 0, grid - 1)[..., None]
    x1 = tf.clip_by_value(cx + lo + block - 1, 0, grid - 1)[..., None]
    in_y = (yy >= y0) & (yy <= y1)                               # [n, centres, grid]
    in_x = (yy >= x0) & (yy <= x1)
    keep = tf.reduce_any(in_y[..., :, None] & in_x[..., None, :], axis=1)
  keep = _exact_count(tf.reshape(keep, [n, length]), keep_target, seeds[1])
  return tf.reshape(~keep, [batch, clones, length])


def _with_visible(mask: tf.Tensor, length: int, masked: int) -> dict:
  return {"mask": mask, "visible": visible_indices(mask, length - masked)}


def random_batch(cfg, seed: tf.Tensor, batch: int, length: int) -> dict:
  """Text batch fields for data2vec 2.0: "mask" bool [b, M, T], "visible" int32 [b, M, K]."""
  v = cfg.v2
  mask = random_mask(seed, batch, int(v.clone_batch), length, float(v.mask_prob))
  return _with_visible(mask, length, length - num_kept(length, float(v.mask_prob)))


def block_2d_batch(cfg, seed: tf.Tensor, batch: int, grid: int) -> dict:
  """Vision batch fields for data2vec 2.0 (inverse block masks on the patch grid)."""
  v = cfg.v2
  mask = inverse_block_mask_2d(seed, batch, int(v.clone_batch), grid, mask_prob=float(v.mask_prob),
                               adjust=float(v.mask_adjust), block=int(v.mask_length))
  length = grid * grid
  return _with_visible(mask, length, length - num_kept(length, float(v.mask_prob)))
