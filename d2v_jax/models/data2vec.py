"""The Data2Vec module: modality embedder + shared Transformer stack + regression head.

One module serves student and teacher: the teacher is the same module applied to a
parameter tree whose EMA subtrees come from the teacher state (d2v_jax/step.py). The
embedder decides what "student" means for its modality (masked ids, mask token, masked
frames); the encoder and head know nothing about modality.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from d2v_jax.models.transformer import Encoder, EncoderSpec, dense


class RegressionHead(nn.Module):
  """Linear, or Linear -> GELU -> Linear (fairseq text `head_layers: 2`)."""
  hidden: int
  layers: int = 1
  hidden_mult: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.layers - 1):
      x = nn.gelu(dense(self.hidden * self.hidden_mult, ("embed", "mlp"), f"dense_{i}", self.dtype)(x),
                  approximate=False)
    axes = ("mlp", "embed") if self.layers > 1 else ("embed", "heads")
    return dense(self.hidden, axes, "out", self.dtype)(x)


class Data2Vec(nn.Module):
  embed: nn.Module
  spec: EncoderSpec
  collect: str = "ffn"
  head_layers: int = 1
  head_hidden_mult: int = 2

  @nn.compact
  def __call__(self, batch, *, student: bool, deterministic: bool = True):
    """Returns dict(final [B,T,D], layers [L,B,T,D], valid [B,T], and pred [B,T,D] for the student)."""
    x, valid, bias = self.embed(batch, student=student, deterministic=deterministic)
    final, layers = Encoder(self.spec, self.collect, name="encoder")(x, bias, deterministic)
    out = {"final": final, "layers": layers, "valid": valid}
    if student:
      out["pred"] = RegressionHead(self.spec.hidden, self.head_layers, self.head_hidden_mult,
                                   self.spec.dtype, name="head")(final)
    return out


def build(cfg, embed: nn.Module) -> Data2Vec:
  return Data2Vec(embed=embed, spec=EncoderSpec.from_config(cfg.model.encoder, cfg.dtype),
                  collect=cfg.target.layer_output, head_layers=cfg.head.layers,
                  head_hidden_mult=cfg.head.hidden_mult)
