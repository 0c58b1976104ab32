"""BEiT block-wise image masking, vectorised over a batch in TensorFlow (docs/algorithm.md §2.2).

BEiT / data2vec_vision (`masking_generator.py`) place rectangular blocks on the patch grid
until `num_masked` patches are covered: each block has an area drawn uniformly from
[min_block, min(max_block, patches still to mask)] and an aspect ratio h/w drawn
log-uniformly from [min_aspect, max_aspect]; h = round(sqrt(area * aspect)),
w = round(sqrt(area / aspect)); a block must be smaller than the grid (h < H, w < W) and is
kept only when it adds at least one new patch and no more than are still missing.

Here, per image of a batch, with fixed shapes and stateless random ops:

1. `attempts` block draws (static count). The block shape is drawn from a fixed table of
   allowed shapes (h, w) whose probabilities are BEiT's continuous area x log-aspect density
   integrated over the rounding cells (`shape_table`); shapes whose area exceeds the patches
   still missing are excluded at each draw (BEiT draws the area up to that number). The
   position is uniform over the grid. A block is kept if it adds >= 1 new patch.
2. The 0 <= r < min_block patches still missing after the draws (BEiT would place smaller
   blocks there) are added where they touch the mask: unmasked patches are ranked by their
   grid distance to the mask (4-neighbour dilation), ties broken at random, and the r
   closest are taken.

Guarantees (tested in tests/test_vision_masking.py):
  * exactly `num_masked` patches per image (a BEiT mask can fall short when 10 draws fail);
  * every drawn block has min_block <= h * w and min_aspect <= h / w <= max_aspect after
    rounding (the table only holds such shapes; BEiT's rounding can give e.g. 2 x 7 = 14);
  * every connected region of the mask holds >= min_block patches: the first draw always
    fits (validation requires a table shape with area <= num_masked), and step 2 only grows
    existing regions (a patch at distance d is taken only after all patches at d - 1).

Patches are numbered row-major (patch index = row * W + col), the order of the patch
embedding's flatten in d2v_jax/models/vision.py and in HF BEiT / Data2VecVision.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import tensorflow as tf

from d2v_jax.config import ConfigError

BEIT_MASK_RATIO = 120 / 196  # --num_mask_patches 120 of 14 x 14 patches


@dataclasses.dataclass(frozen=True)
class BlockMaskSpec:
  grid_h: int
  grid_w: int
  num_masked: int
  min_block: int = 16
  max_block: int | None = None      # None: the whole grid (BEiT --max_mask_patches_per_block 196)
  min_aspect: float = 0.3
  max_aspect: float | None = None   # None: 1 / min_aspect
  attempts: int = 0                 # block draws per image; 0: 4 * ceil(num_masked / min_block)

  @property
  def num_patches(self) -> int:
    return self.grid_h * self.grid_w

  @property
  def max_area(self) -> int:
    return min(self.max_block or self.num_patches, self.num_masked)

  @property
  def aspect_range(self) -> tuple[float, float]:
    return self.min_aspect, self.max_aspect or 1.0 / self.min_aspect

  @property
  def draws(self) -> int:
    return self.attempts or 4 * math.ceil(self.num_masked / max(self.min_block, 1))

  @classmethod
  def from_config(cls, cfg) -> "BlockMaskSpec":
    """From cfg.model (image_size, patch_size) and cfg.data (num_mask_patches, ...)."""
    d = cfg.data
    side = cfg.model.image_size // cfg.model.patch_size
    n = d.num_mask_patches
    if n is None:  # BEiT's 120 / 196, scaled to this grid
      n = int(round(BEIT_MASK_RATIO * side * side))
    return cls(grid_h=side, grid_w=side, num_masked=int(n), min_block=int(d.min_mask_block),
               max_block=None if d.max_mask_block is None else int(d.max_mask_block),
               min_aspect=float(d.mask_min_aspect),
               max_aspect=None if d.mask_max_aspect is None else float(d.mask_max_aspect),
               attempts=int(d.mask_attempts or 0))

  def validate(self) -> None:
    """Raises ConfigError when no block can be drawn or the count is out of range."""
    lo, hi = self.aspect_range
    checks = [
        (self.grid_h >= 2 and self.grid_w >= 2,
         f"patch grid {self.grid_h}x{self.grid_w} is too small for block masking (>= 2x2)"),
        (1 <= self.num_masked <= self.num_patches,
         f"data.num_mask_patches={self.num_masked} must be in [1, {self.num_patches}] "
         f"(patches of a {self.grid_h}x{self.grid_w} grid)"),
        (1 <= self.min_block <= self.num_masked,
         f"data.min_mask_block={self.min_block} must be in [1, data.num_mask_patches="
         f"{self.num_masked}]"),
        (self.max_block is None or self.max_block >= self.min_block,
         f"data.max_mask_block={self.max_block} must be >= data.min_mask_block={self.min_block}"),
        (0 < lo <= hi, f"mask aspect range [{lo}, {hi}] must satisfy 0 < min <= max"),
    ]
    for ok, msg in checks:
      if not ok:
        raise ConfigError(msg)
    if len(shape_table(self)[0]) == 0:
      raise ConfigError(
          f"no mask block of {self.min_block}..{self.max_area} patches with aspect in "
          f"[{lo:.3g}, {hi:.3g}] fits strictly inside the {self.grid_h}x{self.grid_w} patch grid; "
          "lower data.min_mask_block or use a finer patch grid")


@functools.lru_cache(maxsize=32)
def shape_table(spec: BlockMaskSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Allowed block shapes: (heights int32 [S], widths int32 [S], log-probabilities f32 [S]).

  The probability of (h, w) is the share of BEiT's (area ~ U[min_block, max_area],
  log-aspect ~ U[log lo, log hi]) plane that rounds to it, on a 1024 x 1024 midpoint grid
  (deterministic), restricted to shapes inside the grid, with area >= min_block and aspect
  in range after rounding, renormalised.
  """
  lo, hi = spec.aspect_range
  n = 1024
  area = spec.min_block + (np.arange(n) + 0.5) / n * (spec.max_area - spec.min_block)
  log_ar = math.log(lo) + (np.arange(n) + 0.5) / n * (math.log(hi) - math.log(lo))
  a, r = np.meshgrid(area, np.exp(log_ar), indexing="ij")
  h = np.rint(np.sqrt(a * r)).astype(np.int64)   # rint: round half to even, as Python round
  w = np.rint(np.sqrt(a / r)).astype(np.int64)
  eps = 1e-9
  ok = ((h >= 1) & (w >= 1) & (h < spec.grid_h) & (w < spec.grid_w)
        & (h * w >= spec.min_block) & (h * w <= spec.max_area)
        & (h >= lo * w - eps) & (h <= hi * w + eps))
  codes = h[ok] * 10_000 + w[ok]
  uniq, counts = np.unique(codes, return_counts=True)
  hs, ws = (uniq // 10_000).astype(np.int32), (uniq % 10_000).astype(np.int32)
  logp = np.log(counts / counts.sum()).astype(np.float32)
  return hs, ws, logp


def _shift(x: tf.Tensor, dy: int, dx: int, fill) -> tf.Tensor:
  """x [B, H, W] moved by (dy, dx) with `fill` entering at the border."""
  h, w = x.shape[1], x.shape[2]
  pad = [[0, 0], [max(dy, 0), max(-dy, 0)], [max(dx, 0), max(-dx, 0)]]
  y = tf.pad(x, pad, constant_values=fill)
  return y[:, max(-dy, 0):max(-dy, 0) + h, max(-dx, 0):max(-dx, 0) + w]


def block_masks(seed: tf.Tensor, batch_size: int, spec: BlockMaskSpec, *,
                return_blocks: bool = False):
  """seed int [2] -> bool [batch_size, grid_h * grid_w] with exactly spec.num_masked True per row.

  return_blocks=True also returns int32 [batch_size, draws, 5] = (top, left, h, w, kept) of
  every draw (for tests and inspection).
  """
  hs_np, ws_np, logp_np = shape_table(spec)
  if len(hs_np) == 0:
    spec.validate()  # raises with the reason
  H, W, N, B = spec.grid_h, spec.grid_w, spec.num_masked, batch_size
  hs, ws = tf.constant(hs_np), tf.constant(ws_np)
  areas = hs * ws
  logp = tf.constant(logp_np)
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2 * spec.draws + 1)
  rows = tf.range(H, dtype=tf.int32)[None, :, None]
  cols = tf.range(W, dtype=tf.int32)[None, None, :]

  def draw(k, mask, count, blocks):
    remaining = N - count
    fits = areas[None, :] <= remaining[:, None]                       # [B, S]
    any_fit = tf.reduce_any(fits, axis=1)
    # Rows where nothing fits draw from the full table and discard the draw (no -inf rows).
    logits = tf.where(fits | ~any_fit[:, None], logp[None, :], -np.inf)
    s = tf.random.stateless_categorical(logits, 1, seeds[2 * k], dtype=tf.int32)[:, 0]
    h, w = tf.gather(hs, s), tf.gather(ws, s)
    u = tf.random.stateless_uniform([B, 2], seeds[2 * k + 1])
    top = tf.minimum(tf.cast(u[:, 0] * tf.cast(H - h + 1, tf.float32), tf.int32), H - h)
    left = tf.minimum(tf.cast(u[:, 1] * tf.cast(W - w + 1, tf.float32), tf.int32), W - w)
    t, l = top[:, None, None], left[:, None, None]
    block = ((rows >= t) & (rows < t + h[:, None, None])
             & (cols >= l) & (cols < l + w[:, None, None]))
    new = tf.reduce_sum(tf.cast(block & ~mask, tf.int32), axis=[1, 2])
    keep = any_fit & (new > 0)
    blocks = blocks.write(k, tf.stack([top, left, h, w, tf.cast(keep, tf.int32)], axis=1))
    return (k + 1, mask | (block & keep[:, None, None]), count + tf.where(keep, new, 0), blocks)

  # tf.while_loop keeps the graph (and the tracing time inside tf.data) small.
  _, mask, count, blocks = tf.while_loop(
      lambda k, *_: k < spec.draws, draw,
      (tf.constant(0), tf.zeros([B, H, W], tf.bool), tf.zeros([B], tf.int32),
       tf.TensorArray(tf.int32, size=spec.draws, element_shape=[B, 5])))

  # Grow the mask by the r < min_block missing patches, nearest first (see module doc).
  big = H + W + 1

  def dilate(i, dist):
    nb = tf.minimum(tf.minimum(_shift(dist, 1, 0, big), _shift(dist, -1, 0, big)),
                    tf.minimum(_shift(dist, 0, 1, big), _shift(dist, 0, -1, big)))
    return i + 1, tf.minimum(dist, nb + 1)

  _, dist = tf.while_loop(lambda i, _: i < H + W - 2, dilate,
                          (tf.constant(0), tf.where(mask, 0, big)))
  jitter = tf.random.stateless_uniform([B, H, W], seeds[-1])
  score = tf.where(mask, np.inf, tf.cast(dist, tf.float32) + jitter)
  score = tf.reshape(score, [B, H * W])
  rank = tf.argsort(tf.argsort(score, axis=1, stable=True), axis=1, stable=True)
  fill = rank < (N - count)[:, None]
  out = tf.reshape(mask, [B, H * W]) | fill
  if return_blocks:
    return out, tf.transpose(blocks.stack(), [1, 0, 2])
  return out
