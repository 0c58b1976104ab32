"""The Data2Vec module: modality embedder + shared Transformer stack + regression head.

One module serves student and teacher: the teacher is the same module applied to a
parameter tree whose EMA subtrees come from the teacher state (d2v_jax/objectives.py with
ema.teacher_params). The
embedder decides what "student" means for its modality (masked ids, mask token, masked
frames); the encoder and head know nothing about modality.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from d2v_jax.models import decoder as decoder_lib
from d2v_jax.models.transformer import Encoder, EncoderSpec, dense
from d2v_jax.models.visible import scatter_tokens


class RegressionHead(nn.Module):
  """Linear, or Linear -> GELU -> Linear (fairseq text `head_layers: 2`); layers=0: none, the
  encoder output is the prediction (fairseq's data2vec_vision port never applies its head)."""
  hidden: int
  layers: int = 1
  hidden_mult: int = 2
  dtype: Any = jnp.float32
  cpu: bool = False           # built for a CPU mesh (models/cpu_ops.py Dense)

  @nn.compact
  def __call__(self, x):
    if self.layers == 0:
      return x
    for i in range(self.layers - 1):
      x = nn.gelu(dense(self.hidden * self.hidden_mult, ("embed", "mlp"), f"dense_{i}", self.dtype,
                        cpu=self.cpu)(x), approximate=False)
    axes = ("mlp", "embed") if self.layers > 1 else ("embed", "heads")
    return dense(self.hidden, axes, "out", self.dtype, cpu=self.cpu)(x)


class Data2Vec(nn.Module):
  """Student and teacher forwards of data2vec 1.0 and 2.0 (d2v_jax/objectives.py picks).

  v1: `__call__` embeds the (masked) input, runs the encoder and, for the student, the
  regression head. v2: `local` computes the unmasked local features once; `teacher_from`
  encodes them (or the raw input, when the teacher has its own local encoder); `student_v2`
  encodes the K visible tokens of each masked clone and decodes all positions.
  """
  embed: nn.Module
  spec: EncoderSpec
  collect: str = "ffn"
  head_layers: int = 1
  head_hidden_mult: int = 2
  decoder: Any = None          # models/decoder.ConvDecoder (data2vec 2.0) or None
  noise_std: float = 0.01      # data2vec 2.0 decoder input at masked positions: N(0, std)

  def setup(self):
    self.encoder = Encoder(self.spec, self.collect)
    self.head = RegressionHead(self.spec.hidden, self.head_layers, self.head_hidden_mult,
                               self.spec.dtype, cpu=self.spec.on_cpu)

  def __call__(self, batch, *, student: bool, deterministic: bool = True):
    """Returns dict(final [B,T,D], layers [L,B,T,D], valid [B,T], and pred [B,T,D] for the student)."""
    x, valid, bias = self.embed(batch, student=student, deterministic=deterministic)
    final, layers = self.encoder(x, bias, deterministic)
    out = {"final": final, "layers": layers, "valid": valid}
    if student:
      out["pred"] = self.head(final)
    return out

  def local(self, batch, *, deterministic: bool = True):
    """Unmasked local features (x [B, T, D], valid [B, T] or None), computed once per step."""
    return self.embed.local(batch, student=False, deterministic=deterministic)

  def student_from(self, x, valid, mask, *, deterministic: bool):
    """data2vec 1.0 student on precomputed local features (shared with the teacher)."""
    x, valid, bias = self.embed.context(x, valid, deterministic=deterministic, mask=mask)
    final, layers = self.encoder(x, bias, deterministic)
    return {"final": final, "layers": layers, "valid": valid, "pred": self.head(final)}

  def teacher_from(self, x, valid):
    """Teacher forward on the student's local features (shared local encoder)."""
    x, valid, bias = self.embed.context(x, valid, deterministic=True)
    final, layers = self.encoder(x, bias, True)
    return {"final": final, "layers": layers, "valid": valid}

  def student_v2(self, x, valid, mask, visible, *, deterministic: bool, noise_rng):
    """x [N, T, D] local features of N = B * M clones, mask bool [N, T], visible int [N, K].

    Returns dict(pred [N, T, D] decoder output, extra [N, E, D] the encoder's extra-token
    outputs (CLS), final [N, E + K, D])."""
    n_extra = self.embed.num_extra_tokens
    xv, _, bias = self.embed.visible(x, valid, mask, visible, deterministic=deterministic)
    final, _ = self.encoder(xv, bias, deterministic)
    t, d = x.shape[1], final.shape[-1]
    noise = jax.random.normal(noise_rng, (x.shape[0], t, d), jnp.float32) * self.noise_std
    dec_in = scatter_tokens(final[:, n_extra:], visible, noise.astype(final.dtype))
    pred = self.decoder(dec_in, deterministic)
    return {"pred": pred, "extra": final[:, :n_extra], "final": final}

  def init_all(self, batch, v2: bool):
    """Creates every parameter the objective trains (model.init entry point)."""
    if not v2:
      return self(batch, student=True, deterministic=True)
    x, valid = self.local(batch)
    m = batch["mask"].shape[1]
    rep = lambda a: None if a is None else jnp.repeat(a, m, axis=0)
    mask = batch["mask"].reshape((-1,) + batch["mask"].shape[2:])
    visible = batch["visible"].reshape((-1,) + batch["visible"].shape[2:])
    return self.student_v2(rep(x), rep(valid), mask, visible, deterministic=True,
                           noise_rng=jax.random.PRNGKey(0))


def build(cfg, embed: nn.Module, platform: str = "") -> Data2Vec:
  """The model of cfg around the modality's embedder, for `platform` (the mesh's: attention
  kernels and CPU-only speed-ups follow it; "" = jax's default backend)."""
  v2 = cfg.objective == "v2"
  dec = None
  if v2:
    grid = getattr(embed, "grid", 0) if cfg.v2.decoder.kind == "2d" else 0
    dec = decoder_lib.build(cfg, grid=grid, platform=platform)
  return Data2Vec(embed=embed, spec=EncoderSpec.from_config(cfg.model.encoder, cfg.dtype, platform),
                  collect=cfg.target.layer_output, head_layers=cfg.head.layers,
                  head_hidden_mult=cfg.head.hidden_mult, decoder=dec,
                  noise_std=float(cfg.v2.mask_noise_std) if v2 else 0.01)
