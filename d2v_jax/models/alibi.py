"""ALiBi attention biases (Press et al., 2022) as fairseq's data2vec 2.0 builds them
(examples/data2vec/models/modalities/base.py `get_alibi`): symmetric (non-causal) 1-D
distances, head slopes a geometric sequence 2^(-8/n), ..., and for a head count n that is
not a power of two the slopes of the largest power of two below it followed by every other
slope of twice that power.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def slopes(heads: int) -> np.ndarray:
  """float32 [heads]."""
  def power_of_2(n: int) -> list[float]:
    start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
    return [start * start ** i for i in range(n)]

  if math.log2(heads).is_integer():
    return np.asarray(power_of_2(heads), np.float32)
  lower = 2 ** math.floor(math.log2(heads))
  extra = power_of_2(2 * lower)[0::2][:heads - lower]
  return np.asarray(power_of_2(lower) + extra, np.float32)


def alibi_bias(heads: int, length: int, scale=None) -> jnp.ndarray:
  """[1, H, T, T]: -slope_h * |i - j|, times a per-head `scale` [H] when given."""
  pos = np.arange(length)
  dist = -np.abs(pos[None, :] - pos[:, None]).astype(np.float32)     # [T, T]
  bias = jnp.asarray(slopes(heads)[:, None, None] * dist[None])
  if scale is not None:   # after the slopes, in fairseq's order (bias * scale)
    bias = bias * scale[:, None, None]
  return bias[None]
