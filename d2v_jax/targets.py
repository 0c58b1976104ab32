"""data2vec targets and regression losses (docs/algorithm.md §1.2-1.3).

Targets: the teacher's per-layer outputs of the top K blocks, each normalised
(parameter-free LayerNorm over channels, or instance norm over time per channel with padded
frames left out of the statistics), averaged, then optionally normalised again.
Losses: smooth-L1 (beta > 0) or squared error (beta == 0), over masked positions only,
reduced like fairseq (sum over dims x scale, mean over masked positions) or like
data2vec_vision (mean over dims and masked positions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EPS = 1e-5  # F.layer_norm / F.instance_norm default


def layer_norm(x: jax.Array) -> jax.Array:
  """Parameter-free LayerNorm over the last (channel) axis."""
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + EPS)


def instance_norm(x: jax.Array, valid: jax.Array | None) -> jax.Array:
  """Normalises each channel over time (axis -2) per example; padded steps are excluded.

  x: [..., B, T, D]; valid: [B, T] bool or None (all valid). Padded outputs are zeroed.
  """
  if valid is None:
    valid = jnp.ones(x.shape[-3:-1], bool)
  w = valid[..., None].astype(x.dtype)
  n = jnp.maximum(w.sum(-2, keepdims=True), 1.0)
  mean = (x * w).sum(-2, keepdims=True) / n
  var = (jnp.square(x - mean) * w).sum(-2, keepdims=True) / n
  return (x - mean) * jax.lax.rsqrt(var + EPS) * w


def _norm(kind: str, x: jax.Array, valid: jax.Array | None) -> jax.Array:
  if kind == "layer":
    return layer_norm(x)
  if kind == "instance":
    return instance_norm(x, valid)
  if kind == "none":
    return x
  raise ValueError(f"unknown target norm {kind!r}: use layer, instance or none")


def make_targets(layers: jax.Array, valid: jax.Array | None, *, top_k: int,
                 layer_norm_kind: str, final_norm_kind: str) -> jax.Array:
  """layers: [L, B, T, D] teacher per-layer outputs -> targets [B, T, D] (float32)."""
  top = layers[-top_k:].astype(jnp.float32)
  y = _norm(layer_norm_kind, top, valid).mean(0)
  return _norm(final_norm_kind, y, valid)


def targets_from_config(layers, valid, target_cfg) -> jax.Array:
  return make_targets(layers, valid, top_k=target_cfg.top_k, layer_norm_kind=target_cfg.layer_norm,
                      final_norm_kind=target_cfg.final_norm)


def elementwise_loss(pred: jax.Array, target: jax.Array, beta: float) -> jax.Array:
  """Smooth-L1 with `beta` (fairseq / torch definition); beta == 0 is squared error."""
  diff = pred.astype(jnp.float32) - target
  if beta == 0:
    return jnp.square(diff)
  a = jnp.abs(diff)
  return jnp.where(a < beta, 0.5 * jnp.square(diff) / beta, a - 0.5 * beta)


def per_row_loss(pred: jax.Array, target: jax.Array, *, beta: float, scale: float | None,
                 reduce_dims: str) -> jax.Array:
  """[..., D] -> [...]: the per-position loss of `regression_loss` before the mean."""
  d = pred.shape[-1]
  per_pos = elementwise_loss(pred, target, beta)
  if reduce_dims == "sum":
    return per_pos.sum(-1) * (d ** -0.5 if scale is None else scale)
  return per_pos.mean(-1) * (1.0 if scale is None else scale)


def masked_mean(x: jax.Array, valid: jax.Array | None) -> jax.Array:
  """x [B, T, D] -> [B, D]: mean over the valid positions (all when valid is None)."""
  if valid is None:
    return x.mean(1)
  w = valid.astype(x.dtype)[..., None]
  return (x * w).sum(1) / jnp.maximum(w.sum(1), 1.0)


def regression_loss(pred: jax.Array, target: jax.Array, mask: jax.Array, *, beta: float,
                    scale: float | None, reduce_dims: str) -> tuple[jax.Array, jax.Array]:
  """Loss over positions where `mask` [B, T] is True. Returns (loss, number of masked positions).

  reduce_dims="sum": per position sum over D times `scale` (None -> 1/sqrt(D)), mean over
  masked positions (fairseq text/audio). "mean": mean over D and masked positions
  (data2vec_vision's F.smooth_l1_loss), times `scale` (None -> 1).
  """
  per_pos = per_row_loss(pred, target, beta=beta, scale=scale, reduce_dims=reduce_dims)
  m = mask.astype(jnp.float32)
  n = m.sum()
  return (per_pos * m).sum() / jnp.maximum(n, 1.0), n


def masked_std_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """fairseq `compute_var`: per-dim std over the selected positions, averaged over dims.

  x: [B, T, D]; mask: [B, T]. Unbiased (n - 1) variance, as torch.var does.
  """
  m = mask.astype(jnp.float32)[..., None]
  n = m.sum()
  mean = (x.astype(jnp.float32) * m).sum((0, 1)) / jnp.maximum(n, 1.0)
  var = (jnp.square(x.astype(jnp.float32) - mean) * m).sum((0, 1)) / jnp.maximum(n - 1.0, 1.0)
  return jnp.sqrt(var + 1e-6).mean()
