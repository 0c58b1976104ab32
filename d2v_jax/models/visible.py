"""The data2vec 2.0 student's view: gathers of the K visible positions (docs/algorithm.md §3.3, §3.9).

Masks arrive with an exact masked count per row, so the visible indices `visible` [N, K]
(ascending, from the host) have a static K. A token sequence is gathered on its length axis;
an attention bias over the full sequence (BEiT relative position table, ALiBi) is gathered
on BOTH its query and key axes with the same indices, so every kept pair of tokens keeps the
bias of its true distance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gather_tokens(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x [N, T, ...], idx int [N, K] -> x[n, idx[n]] of shape [N, K, ...]."""
  idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def gather_bias(bias: jax.Array, idx: jax.Array) -> jax.Array:
  """bias [1|N, H, T, T], idx int [N, K] -> [N, H, K, K]: rows and columns of the kept tokens."""
  n = idx.shape[0]
  bias = jnp.broadcast_to(bias, (n,) + bias.shape[1:])
  rows = jnp.take_along_axis(bias, idx[:, None, :, None], axis=2)
  return jnp.take_along_axis(rows, idx[:, None, None, :], axis=3)


def with_extra(idx: jax.Array, num_extra: int) -> jax.Array:
  """Indices of the visible tokens in a sequence that starts with `num_extra` extra tokens
  (CLS): the extra tokens first, then idx + num_extra."""
  if not num_extra:
    return idx
  lead = jnp.broadcast_to(jnp.arange(num_extra, dtype=idx.dtype), (idx.shape[0], num_extra))
  return jnp.concatenate([lead, idx + num_extra], axis=1)


def scatter_tokens(x_visible: jax.Array, idx: jax.Array, fill: jax.Array) -> jax.Array:
  """Inverse of gather_tokens: x_visible [N, K, D] placed at idx [N, K] of `fill` [N, T, D]."""
  n = x_visible.shape[0]
  rows = jnp.arange(n)[:, None]
  return fill.at[rows, idx].set(x_visible.astype(fill.dtype))
