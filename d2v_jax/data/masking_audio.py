"""wav2vec2 / data2vec-audio span masking on conv frames, vectorised over a batch in TensorFlow.

Per row (fairseq `compute_mask_indices`, mask_selection "static", overlaps allowed,
ALGORITHM.md §2.3): with n = valid frames (conv output length of the real samples),
starts = max(int(mask_prob * n / span + U[0, 1)), min_spans) positions drawn uniformly
without replacement from [0, n - span] (HF's range; fairseq's stops one frame earlier);
each start masks `span` frames. Padding is never masked: a row shorter than `span` gets one
span clipped at its valid length.

`same_count` (fairseq `require_same_masks`): every row ends with the batch minimum m of
masked frames. fairseq drops random masked frames to get there, which breaks spans into
runs shorter than `span`; here each row keeps its first m masked frames in time order
instead, and if that cuts its last kept run below `span` frames, the cut run is dropped and
the run before it is extended by the same number of frames (into unmasked frames that lie
inside the valid length). So every run is >= `span` frames unless clipped by a valid length
shorter than `span` (or m < span, which only such a row causes).

All randomness is stateless and derived from one [2] seed: the same seed gives the same mask
eagerly and inside tf.data, on any host, at any resume point.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf


def conv_output_length(length, kernels: Sequence[int], strides: Sequence[int]):
  """Frames after the conv feature extractor (no padding): L <- floor((L - k) / s) + 1 per
  layer, clamped at 0. Works on Python ints, numpy, TF and JAX integer arrays (floor
  division), and equals HF `_get_feat_extract_output_lengths` wherever that is >= 0."""
  for k, s in zip(kernels, strides):
    length = (length - k) // s + 1
  if isinstance(length, int):
    return max(length, 0)
  return (length + abs(length)) // 2  # max(length, 0) for numpy, TF and JAX integer arrays


def max_spans(num_frames: int, mask_prob: float, span: int, min_spans: int) -> int:
  """Static bound on the starts one row can draw (sizes the top-k)."""
  return int(min(num_frames, max(int(mask_prob * num_frames / span + 1), min_spans)))


def span_mask(seed: tf.Tensor, lengths: tf.Tensor, num_frames: int, *, mask_prob: float,
              span: int, min_spans: int = 1, same_count: bool = True) -> tf.Tensor:
  """seed int [2], lengths int [B] valid frames -> bool [B, num_frames] mask."""
  t = int(num_frames)
  lengths = tf.minimum(tf.cast(lengths, tf.int32), t)
  b = tf.shape(lengths)[0]
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2)
  pos = tf.range(t, dtype=tf.int32)[None, :]

  # Number of starts per row, float64 like fairseq's numpy so int(...) rounds the same way.
  u = tf.random.stateless_uniform([b], seeds[0], dtype=tf.float64)
  num = tf.cast(tf.floor(mask_prob * tf.cast(lengths, tf.float64) / span + u), tf.int32)
  num = tf.maximum(num, min_spans)
  num_cand = tf.where(lengths > 0, tf.maximum(lengths - span + 1, 1), 0)
  num = tf.minimum(num, num_cand)

  # Uniform choice without replacement: the `num` largest of i.i.d. keys over the candidates.
  k = max_spans(t, mask_prob, span, min_spans)
  keys = tf.random.stateless_uniform([b, t], seeds[1], dtype=tf.float64)
  keys = tf.where(pos < num_cand[:, None], keys, -1.0)
  _, starts = tf.math.top_k(keys, k=k)                                   # [B, k]
  use = tf.range(k)[None, :] < num[:, None]
  is_start = tf.reduce_sum(tf.one_hot(starts, t, dtype=tf.int32) * tf.cast(use, tf.int32)[..., None], 1)
  # Frame f is masked iff some start lies in (f - span, f]: a difference of prefix sums.
  c = tf.cumsum(is_start, axis=1)
  c_before = tf.pad(c[:, :-span], [[0, 0], [span, 0]]) if span < t else tf.zeros_like(c)
  mask = ((c - c_before) > 0) & (pos < lengths[:, None])
  if not same_count:
    return mask
  return _equalise(mask, span)


def _equalise(mask: tf.Tensor, span: int) -> tf.Tensor:
  """Trims every row to the batch-minimum count, keeping runs >= span (module docstring)."""
  t = tf.shape(mask)[1]
  pos = tf.range(t, dtype=tf.int32)[None, :]
  mi = tf.cast(mask, tf.int32)
  cs = tf.cumsum(mi, axis=1)
  m = tf.reduce_min(cs[:, -1])
  keep = mask & (cs <= m)
  last = tf.reduce_max(tf.where(keep, pos, -1), axis=1)                        # last kept frame
  run_start = tf.reduce_max(tf.where(~mask & (pos < last[:, None]), pos, -1), axis=1) + 1
  q = last - run_start + 1                                                     # its run's length
  prev_end = tf.reduce_max(tf.where(mask & (pos < run_start[:, None]), pos, -1), axis=1)
  fix = (q < span) & (prev_end >= 0) & (last >= 0)
  q = tf.where(fix, q, 0)[:, None]
  prev_end = prev_end[:, None]
  head = mask & (cs <= m - q)
  extend = (pos > prev_end) & (pos <= prev_end + q)
  return head | extend
