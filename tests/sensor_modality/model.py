"""The sensor embedder: [B, W, C] signal -> [B, W / patch, D] tokens (v1 only)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from d2v_jax.models.transformer import INIT, dense, layer_norm

ATTENTION_BIAS = "none"   # fixed-length windows: no padding, no bias


class SensorEmbed(nn.Module):
  patch: int
  hidden: int
  dtype: Any = jnp.float32
  num_extra_tokens: int = 0

  @nn.compact
  def __call__(self, batch, *, student: bool, deterministic: bool):
    del deterministic
    x = batch["signal"].astype(self.dtype)
    b, w, c = x.shape
    x = dense(self.hidden, ("conv_in", "embed"), "proj", self.dtype)(
        x.reshape(b, w // self.patch, self.patch * c))
    if student:   # masked patches read the learned mask token
      token = self.param("mask_token", nn.with_logical_partitioning(INIT, ("embed",)),
                         (self.hidden,), jnp.float32)
      x = jnp.where(batch["mask"][..., None], token.astype(x.dtype), x)
    else:
      self.param("mask_token", nn.with_logical_partitioning(INIT, ("embed",)), (self.hidden,),
                 jnp.float32)
    pos = self.param("position", nn.with_logical_partitioning(INIT, ("conv_in", "embed")),
                     (w // self.patch, self.hidden), jnp.float32)
    x = layer_norm(1e-5, "norm", self.dtype)(x + pos.astype(x.dtype))
    return x, None, None


def build(cfg) -> SensorEmbed:
  return SensorEmbed(patch=int(cfg.model.patch), hidden=int(cfg.model.encoder.hidden),
                     dtype=jnp.dtype(cfg.dtype))
