"""wav2vec2 / data2vec-audio masks on conv frames, vectorised over a batch in TensorFlow.

data2vec 1.0 span masks, `span_mask` (fairseq `compute_mask_indices`, mask_selection
"static", overlaps allowed, docs/algorithm.md §2.3). Per row with n valid frames (conv output
length of its real samples): s = max(int(mask_prob * n / span + U[0, 1)), min_spans)
starts drawn uniformly without replacement from the n valid frames, each masking `span`
frames. A span that runs past the valid length wraps around to the row's first frames.
That wrap is ours: fairseq / HF draw starts from [0, n - span] only, so a frame within
`span` of either end is covered by fewer starts (the first frame is masked with p ~0.07
instead of ~0.49); with the wrap every valid frame has the same probability.

Exact count per row (`same_count`, default; fairseq `require_same_masks`): every row then
ends with exactly round(E[n]) masked frames, E[n] = the expected masked count of fairseq's /
HF's draw at valid length n (`expected_masked`, computed exactly): random masked frames are
removed, or random unmasked valid frames added (fairseq's require_same_masks removes random
frames with rng.choice, down to the batch minimum). The count depends only on the row's own
valid length, so rows of equal length (every row of a length-bucketed batch) end with the
same count, which is what require_same_masks is for, while a 2 s row next to a 16 s row no
longer pulls the long row down to the short row's count. Padding is never masked; a row
shorter than `span` is masked entirely (one span, min_spans = 1).

data2vec 2.0 block masks, `block_mask_1d` (fairseq `compute_block_mask_1d`, docs/algorithm.md
§3.4): int(T * (R + A) / B) random centres per row (duplicates possible), B frames around
each (offsets -(B // 2) .. B - B // 2 - 1, clamped at the borders), then random frames are
added / removed until exactly int(T * R) are masked; M clones per example, each its own mask.

All randomness is stateless and derived from one [2] seed: the same seed gives the same mask
eagerly and inside tf.data, on any host, at any resume point.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf


def receptive_field(kernels: Sequence[int], strides: Sequence[int]) -> tuple[int, int]:
  """(stride, width) in samples of one output frame of the conv feature extractor: frame t
  reads samples [t * stride, t * stride + width)."""
  width, stride = 1, 1
  for k, s in reversed(list(zip(kernels, strides))):
    width = (width - 1) * s + k
  for s in strides:
    stride *= s
  return stride, width


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


def expected_masked(max_frames: int, mask_prob: float, span: int, min_spans: int = 1) -> np.ndarray:
  """float64 [max_frames + 1]: the expected number of masked frames of fairseq's / HF's span
  draw (starts uniform without replacement from the C = max(n - span + 1, 1) positions
  [0, n - span], whole spans clipped at n, overlaps merged) at every valid length n.

  Frame f is covered by the w_f starts in [f - span + 1, f] ∩ [0, C - 1]; with s starts it
  stays unmasked with probability C(C - w_f, s) / C(C, s) = prod_i<w_f (C - s - i) / (C - i);
  s = floor(x) or floor(x) + 1 with x = mask_prob * n / span (fairseq's int(x + U[0, 1)))."""
  key = (float(mask_prob), int(span), int(min_spans))
  table = _TABLES.get(key)
  if table is None or len(table) <= max_frames:  # one table per setting, grown on demand
    table = _expected_masked(max(int(max_frames), 2 * len(table) if table is not None else 1024), *key)
    _TABLES[key] = table
  return table[:int(max_frames) + 1].copy()


_TABLES: dict = {}


def _expected_masked(max_frames: int, mask_prob: float, span: int, min_spans: int) -> np.ndarray:
  out = np.zeros(max_frames + 1)
  i = np.arange(span)[None, :]
  for n in range(1, max_frames + 1):
    c = max(n - span + 1, 1)
    f = np.arange(n)[:, None]
    w = np.minimum(f, c - 1) - np.maximum(0, f - span + 1) + 1            # [n, 1]
    x = mask_prob * n / span
    lo = int(np.floor(x))
    for s_raw, prob in ((lo, 1.0 - (x - lo)), (lo + 1, x - lo)):
      if prob <= 0:
        continue
      s = min(max(s_raw, min_spans), c)
      ratio = np.clip((c - s - i) / np.maximum(c - i, 1), 0, None)     # terms i >= w unused
      free = np.prod(np.where(i < w, ratio, 1.0), axis=1)
      out[n] += prob * (n - free.sum())
  return out


def target_counts(max_frames: int, mask_prob: float, span: int, min_spans: int = 1) -> np.ndarray:
  """int32 [max_frames + 1]: the exact masked count of a row of n valid frames,
  round(expected_masked(n)) (never above n)."""
  e = expected_masked(max_frames, mask_prob, span, min_spans)
  return np.minimum(np.rint(e), np.arange(max_frames + 1)).astype(np.int32)


def force_count(mask: tf.Tensor, valid: tf.Tensor, target: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """mask, valid bool [..., T] (mask inside valid), target int [...] <= valid count ->
  bool [..., T] with exactly `target` True per row, all valid: random masked frames are
  removed when there are too many, random unmasked valid frames added when too few."""
  u = tf.random.stateless_uniform(tf.shape(mask), seed, dtype=tf.float32)
  # Rank: masked frames first (random order), then unmasked valid ones, padding last.
  key = tf.where(mask, u, tf.where(valid, u + 2.0, 4.0))
  rank = tf.argsort(tf.argsort(key, axis=-1, stable=True), axis=-1, stable=True)
  return (rank < tf.cast(target, tf.int32)[..., None]) & valid


def _cover(starts: tf.Tensor, use: tf.Tensor, offsets: tf.Tensor, limit: tf.Tensor, t: int,
           wrap: bool) -> tf.Tensor:
  """bool [N, t]: frames starts[:, j] + offsets (j with use[:, j]) of each row, taken modulo
  limit (wrap) or clamped to [0, limit - 1]; limit int [N] >= 1."""
  n = tf.shape(starts)[0]
  f = starts[..., None] + offsets[None, None, :]                           # [N, k, span]
  lim = limit[:, None, None]
  f = f % lim if wrap else tf.clip_by_value(f, 0, lim - 1)
  rows = tf.broadcast_to(tf.range(n)[:, None, None], tf.shape(f))
  hit = tf.broadcast_to(tf.cast(use, tf.int32)[..., None], tf.shape(f))
  idx = tf.reshape(tf.stack([rows, f], axis=-1), [-1, 2])
  return tf.tensor_scatter_nd_max(tf.zeros([n, t], tf.int32), idx, tf.reshape(hit, [-1])) > 0


def span_mask(seed: tf.Tensor, lengths: tf.Tensor, num_frames: int, *, mask_prob: float,
              span: int, min_spans: int = 1, same_count: bool = True) -> tf.Tensor:
  """seed int [2], lengths int [B] valid frames -> bool [B, num_frames] mask (module
  docstring). same_count=False: the raw span draw (its count varies per row)."""
  t = int(num_frames)
  lengths = tf.minimum(tf.cast(lengths, tf.int32), t)
  b = tf.shape(lengths)[0]
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=3)
  valid = tf.range(t, dtype=tf.int32)[None, :] < lengths[:, None]

  # Number of starts per row, float64 like fairseq's numpy so int(...) rounds the same way.
  u = tf.random.stateless_uniform([b], seeds[0], dtype=tf.float64)
  num = tf.cast(tf.floor(mask_prob * tf.cast(lengths, tf.float64) / span + u), tf.int32)
  num = tf.minimum(tf.maximum(num, min_spans), lengths)

  # Uniform choice without replacement: the `num` largest of i.i.d. keys over the valid frames.
  k = max_spans(t, mask_prob, span, min_spans)
  keys = tf.random.stateless_uniform([b, t], seeds[1], dtype=tf.float64)
  _, starts = tf.math.top_k(tf.where(valid, keys, -1.0), k=k)              # [B, k]
  use = tf.range(k)[None, :] < num[:, None]
  mask = _cover(starts, use, tf.range(span), tf.maximum(lengths, 1), t, wrap=True) & valid
  if not same_count:
    return mask
  target = tf.gather(tf.constant(target_counts(t, mask_prob, span, min_spans)), lengths)
  return force_count(mask, valid, target, seeds[2])


def block_mask_1d(seed: tf.Tensor, lengths_or_T, batch, clones: int, num_frames: int, *,
                  mask_prob: float, adjust: float, length: int) -> tf.Tensor:
  """data2vec 2.0 audio masks: bool [batch, clones, num_frames], True = masked (module
  docstring). lengths_or_T: None or an int (every row has num_frames valid frames: the
  length-bucketed case, exactly int(T * R) masked per row, so K = T - int(T * R) frames
  stay visible), or int [batch] valid frames per example (each row gets int(n * R) masked
  frames inside its valid length; padding is never masked)."""
  t = int(num_frames)
  if lengths_or_T is None or isinstance(lengths_or_T, (int, np.integer)):
    if lengths_or_T is not None and int(lengths_or_T) != t:
      raise ValueError(f"lengths_or_T={lengths_or_T} must equal num_frames={t} (or be per-row lengths)")
    lengths = tf.fill([batch * clones], t)
  else:
    lengths = tf.repeat(tf.minimum(tf.cast(lengths_or_T, tf.int32), t), clones)  # sample-major
  rows = tf.shape(lengths)[0]
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2)
  valid = tf.range(t, dtype=tf.int32)[None, :] < lengths[:, None]
  # Same float64 arithmetic as fairseq's int(L * ((R + A) / B)) and int(L * R).
  lf = tf.cast(lengths, tf.float64)
  density = (mask_prob + adjust) / length
  num = tf.cast(tf.floor(lf * density), tf.int32)
  target = tf.cast(tf.floor(lf * mask_prob), tf.int32)
  k = int(t * density)
  if k > 0:
    # torch.randint(0, L): uniform centres, duplicates allowed.
    u = tf.random.stateless_uniform([rows, k], seeds[0], dtype=tf.float64)
    centres = tf.cast(tf.floor(u * lf[:, None]), tf.int32)
    use = tf.range(k)[None, :] < num[:, None]
    offsets = tf.range(length) - length // 2
    mask = _cover(centres, use, offsets, tf.maximum(lengths, 1), t, wrap=False) & valid
  else:
    mask = tf.zeros([rows, t], tf.bool)
  mask = force_count(mask, valid, target, seeds[1])
  return tf.reshape(mask, [batch, clones, t])
