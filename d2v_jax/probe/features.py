"""Token features of one encoder block on the unmasked input, for probes and the rank hook.

Features: the end-of-block output of block N (1-based; negative counts from the end; default
the last block), mean-pooled over the valid, non-extra tokens (no CLS, no padding); no final
norm, no head. Also their Gram matrix over those tokens (the effective rank, probe/rank.py).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from d2v_jax import sharding
from d2v_jax.config import ConfigError


@dataclasses.dataclass
class Features:
  pooled: np.ndarray    # [N, D] mean over valid, non-extra tokens
  gram: np.ndarray      # [D, D] float64: sum over those tokens of x x^T (effective rank)
  tokens: int           # number of tokens in `gram`


def layer_index(layer: int, num_layers: int) -> int:
  """1-based block number (negative: from the end) -> 0-based index into the stack."""
  if 1 <= layer <= num_layers:
    return layer - 1
  if -num_layers <= layer <= -1:
    return num_layers + layer
  raise ConfigError(f"layer={layer}: use 1..{num_layers} (block number) or -1..-{num_layers} "
                    "(from the end)")


class FeatureEncoder:
  """Jitted forward on `built.mesh`: (params, arrays) -> Features of the chosen block.

  Runs in chunks of `chunk` examples (a multiple of the batch shards, so the model's batch
  sharding constraint holds); the last chunk is padded with rows that count nowhere.
  """

  def __init__(self, built, layer: int = -1, chunk: int = 64):
    self.mesh = built.mesh
    self.num_layers = int(built.cfg.model.encoder.num_layers)
    self.index = layer_index(int(layer), self.num_layers)
    shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    self.chunk = shards * max(1, math.ceil(chunk / shards))
    model = built.model.clone(collect="end")  # same params; per-block end-of-block outputs
    n_extra, idx = model.embed.num_extra_tokens, self.index

    def fn(params, batch, ok):
      with nn.logical_axis_rules(sharding.RULES):
        out = model.apply({"params": params}, batch, student=False, deterministic=True)
      h = out["layers"][idx][:, n_extra:].astype(jnp.float32)
      valid = out["valid"]
      w = jnp.ones(h.shape[:2], jnp.float32) if valid is None else valid[:, n_extra:].astype(jnp.float32)
      w = w * ok[:, None].astype(jnp.float32)
      pooled = (h * w[..., None]).sum(1) / jnp.maximum(w.sum(1, keepdims=True), 1.0)
      hw = h * w[..., None]
      return pooled, jnp.einsum("btd,bte->de", hw, hw), w.sum()

    self._rep = NamedSharding(self.mesh, P())
    self._fn = jax.jit(fn, out_shardings=(self._rep, self._rep, self._rep))

  def __call__(self, params, arrays: dict) -> Features:
    n = len(next(iter(arrays.values())))
    pooled, gram, tokens = [], None, 0.0
    with jax.set_mesh(self.mesh):
      for start in range(0, n, self.chunk):
        stop = min(start + self.chunk, n)
        pad = self.chunk - (stop - start)
        rows = np.r_[np.arange(start, stop), np.full(pad, start, np.int64)]
        batch = {k: jax.device_put(np.asarray(v)[rows], self._rep) for k, v in arrays.items()
                 if np.asarray(v).dtype.kind in "biuf"}  # model inputs only (no file names)
        ok = jax.device_put(np.arange(self.chunk) < stop - start, self._rep)
        p, g, c = jax.device_get(self._fn(params, batch, ok))
        pooled.append(np.asarray(p)[: stop - start])
        g = np.asarray(g, np.float64)
        gram = g if gram is None else gram + g
        tokens += float(c)
    return Features(np.concatenate(pooled), gram, int(tokens))
