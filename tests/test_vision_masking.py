"""BEiT block masking (d2v_jax/data/masking_vision.py): counts, block sizes / aspect, regions,
determinism, eager == tf.data, other grids, config validation."""

import math
import random

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from d2v_jax.config import ConfigError
from d2v_jax.data.masking_vision import BlockMaskSpec, block_masks, shape_table

BEIT = BlockMaskSpec(grid_h=14, grid_w=14, num_masked=120)   # 224 px, 16 px patches


def _masks(spec, batch=256, seed=(3, 7)):
  m, blocks = block_masks(tf.constant(seed, tf.int64), batch, spec, return_blocks=True)
  return m.numpy(), blocks.numpy()


def _region_sizes(mask_row, spec):
  labels, n = ndimage.label(mask_row.reshape(spec.grid_h, spec.grid_w))  # 4-connectivity
  return np.bincount(labels.ravel())[1:]


@pytest.mark.parametrize("spec", [
    BEIT,
    BlockMaskSpec(grid_h=8, grid_w=8, num_masked=39),            # runlocal: 64 px / 8 px
    BlockMaskSpec(grid_h=24, grid_w=24, num_masked=353),         # 384 px / 16 px
    BlockMaskSpec(grid_h=14, grid_w=14, num_masked=60, min_block=4, max_block=40,
                  min_aspect=0.5),
], ids=["224px_p16", "64px_p8", "384px_p16", "custom"])
def test_count_blocks_regions(spec):
  masks, blocks = _masks(spec)
  lo, hi = spec.aspect_range
  assert masks.shape == (256, spec.num_patches) and masks.dtype == bool
  # A fixed count for every image.
  np.testing.assert_array_equal(masks.sum(1), spec.num_masked)
  kept = blocks[blocks[..., 4] == 1]
  h, w = kept[:, 2], kept[:, 3]
  # Every block that was placed: >= min_block patches, aspect in range, strictly inside the grid.
  assert (h * w >= spec.min_block).all() and (h * w <= spec.max_area).all()
  assert (h / w >= lo - 1e-9).all() and (h / w <= hi + 1e-9).all()
  assert (h < spec.grid_h).all() and (w < spec.grid_w).all()
  assert (kept[:, 0] + h <= spec.grid_h).all() and (kept[:, 1] + w <= spec.grid_w).all()
  # Every image had its first draw placed, and every placed block is fully masked.
  assert (blocks[:, 0, 4] == 1).all()
  for i in range(8):
    grid = masks[i].reshape(spec.grid_h, spec.grid_w)
    for top, left, bh, bw, keep in blocks[i]:
      if keep:
        assert grid[top:top + bh, left:left + bw].all()
  # Every connected masked region holds >= min_block patches (the guarantee of the fill step).
  smallest = min(_region_sizes(m, spec).min() for m in masks)
  assert smallest >= spec.min_block, smallest


def _beit_reference(rng, H=14, W=14, N=120, min_block=16, min_aspect=0.3):
  """BEiT / data2vec_vision MaskingGenerator, re-stated in plain Python (per-image loops)."""
  log_lo, log_hi = math.log(min_aspect), math.log(1 / min_aspect)
  mask, count = np.zeros((H, W), bool), 0
  while count < N:
    max_new, delta = N - count, 0
    for _ in range(10):
      area = rng.uniform(min_block, max_new)
      aspect = math.exp(rng.uniform(log_lo, log_hi))
      h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
      if w < W and h < H:
        top, left = rng.randint(0, H - h), rng.randint(0, W - w)
        new = h * w - mask[top:top + h, left:left + w].sum()
        if 0 < new <= max_new:
          mask[top:top + h, left:left + w] = True
          delta = new
      if delta > 0:
        break
    if delta == 0:
      break
    count += delta
  return mask.ravel()


def test_matches_beit_reference_statistics():
  """Per-patch masking frequency (border effects included) is BEiT's, within sampling noise."""
  n = 2000
  ref = np.stack([_beit_reference(random.Random(i)) for i in range(n)])
  masks, blocks = _masks(BEIT, batch=n)
  diff = np.abs(ref.mean(0) - masks.mean(0))
  assert diff.max() < 0.06, diff.max()          # noise: ~0.011 std per patch at n = 2000
  assert ref.sum(1).min() < 120                  # BEiT can fall short; we never do
  kept = blocks[blocks[..., 4] == 1]
  ratio = kept[:, 2] / kept[:, 3]
  assert ratio.min() < 0.45 and ratio.max() > 2.2          # both elongations occur
  assert 2.0 < (blocks[..., 4] == 1).sum(1).mean() < 8.0   # a few blocks per image
  assert len({m.tobytes() for m in masks}) > 0.99 * n      # images differ (one 10x12 block can repeat)


def test_shape_table_is_beit_distribution():
  hs, ws, logp = shape_table(BEIT)
  p = np.exp(logp.astype(np.float64))
  assert abs(p.sum() - 1) < 1e-5 and (hs * ws >= 16).all() and (hs < 14).all() and (ws < 14).all()
  # Area ~ U[16, 120] before rounding / rejection: the mean block area is close to 68.
  mean_area = float((p * hs * ws).sum())
  assert 55 < mean_area < 75, mean_area
  # Log-aspect is symmetric: (h, w) and (w, h) are equally likely.
  table = {(int(h), int(w)): q for h, w, q in zip(hs, ws, p)}
  for (h, w), q in table.items():
    if (w, h) in table:
      assert abs(q - table[(w, h)]) < 2e-3


def test_deterministic_and_seed_dependent():
  a, _ = _masks(BEIT, batch=32, seed=(1, 2))
  b, _ = _masks(BEIT, batch=32, seed=(1, 2))
  c, _ = _masks(BEIT, batch=32, seed=(1, 3))
  np.testing.assert_array_equal(a, b)
  assert (a != c).any(axis=1).all()


def test_eager_equals_tf_data():
  spec = BlockMaskSpec(grid_h=8, grid_w=8, num_masked=39)
  seeds = tf.constant([[0, s] for s in range(4)], tf.int64)
  ds = tf.data.Dataset.from_tensor_slices(seeds).map(lambda s: block_masks(s, 16, spec),
                                                     num_parallel_calls=2)
  for s, from_ds in zip(seeds, ds.as_numpy_iterator()):
    np.testing.assert_array_equal(block_masks(s, 16, spec).numpy(), from_ds)


def test_attempts_default_and_override():
  assert BEIT.draws == 4 * math.ceil(120 / 16)
  one = BlockMaskSpec(grid_h=14, grid_w=14, num_masked=120, attempts=1)
  masks, blocks = _masks(one, batch=64)
  # One block, then the fill grows that single region to the exact count.
  np.testing.assert_array_equal(masks.sum(1), 120)
  assert blocks.shape[1] == 1
  assert all(len(_region_sizes(m, one)) == 1 for m in masks)


@pytest.mark.parametrize("kw, match", [
    (dict(grid_h=14, grid_w=14, num_masked=197), "num_mask_patches=197"),
    (dict(grid_h=14, grid_w=14, num_masked=10), "min_mask_block=16"),
    (dict(grid_h=4, grid_w=4, num_masked=10, min_block=10), "no mask block"),
    (dict(grid_h=14, grid_w=14, num_masked=120, max_block=8), "max_mask_block=8"),
])
def test_validate_rejects(kw, match):
  with pytest.raises(ConfigError, match=match):
    BlockMaskSpec(**kw).validate()
