"""Waveform embedder for data2vec-audio (wav2vec 2.0 front end, docs/algorithm.md §2.3, §5.3).

  audio [B, S] -> conv feature extractor (per layer: Conv1d without bias -> LayerNorm over
  channels -> GELU; or wav2vec2-base GroupNorm on the first layer) -> LayerNorm -> Linear to
  the model width -> dropout -> (student) learned mask embedding on batch["mask"] frames ->
  padded frames set to 0 -> x + positional conv(x).

The encoder's input LayerNorm (`encoder/input_norm`, HF `encoder.layer_norm`) comes right
after, inside the shared Transformer stack (post-LN, input_norm=True). The positional conv
lives here, in the embedder, so the teacher uses the student's (fairseq copies `pos_conv`
into the teacher every step instead of averaging it) and reads the student's features of
the unmasked input: only params['encoder'] is EMA'd (fairseq `ema_transformer_only`).

Batch: "audio" float32 [B, S] (right-padded, per-utterance normalised), "audio_len" int32
[B] real samples per row, "mask" bool [B, T] with T = conv_output_length(S). Frame validity
comes from the conv length arithmetic on audio_len, exactly as HF
`_get_feature_vector_attention_mask`; padded frames are zeroed before the positional conv
and hidden from attention (HF Data2VecAudioModel / fairseq do the same, so outputs near the
end of a padded row depend on the padding, as in HF).

Positional encoders: "data2vec" = `pos_conv_depth` x [grouped Conv1d (kernel
pos_conv_kernel, 'same' padding, bias) -> LayerNorm without affine -> GELU];
"wav2vec2" = one weight-normalised grouped Conv1d (kernel 128, weight norm over the kernel
axis like torch weight_norm(dim=2)), last frame dropped for even kernels, GELU.

`alibi` (model.alibi; fairseq data2vec 2.0 audio `use_alibi_encoder` with
`learned_alibi_scale_per_head`): every layer's attention also gets the symmetric ALiBi bias
-slope_h * |i - j| times a learned per-head scale (clamped at 0, initial 1), so the bias is
per example ([B, H, T, T], padding included). No Hugging Face class holds it: the export
writes remote code (d2v_jax/hf/remote/).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from d2v_jax.data.masking_audio import conv_output_length
from d2v_jax.models.transformer import constrain, padding_bias
from d2v_jax.models.visible import gather_bias, gather_tokens
from d2v_jax.models.alibi import alibi_bias

# The attention bias kind (transformer.BIAS_KINDS) this embedder returns: key padding.
# The trainer's start-up line names the attention implementation chosen for it.
ATTENTION_BIAS = "padding"

_CONV_AXES = ("conv_kernel", "conv_in", "conv_out")


def _init(init, axes):
  return nn.with_logical_partitioning(init, axes)


def _ln(eps: float, name: str | None, dtype, affine: bool = True, axis_name: str = "embed") -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name, use_scale=affine, use_bias=affine,
      scale_init=_init(nn.initializers.ones, (axis_name,)),
      bias_init=_init(nn.initializers.zeros, (axis_name,)))


def _conv1d(features: int, kernel: int, *, stride: int = 1, padding=((0, 0),), groups: int = 1,
            use_bias: bool, kernel_init, dtype, name: str | None) -> nn.Conv:
  return nn.Conv(features, (kernel,), strides=(stride,), padding=padding, feature_group_count=groups,
                 use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
                 kernel_init=_init(kernel_init, _CONV_AXES),
                 bias_init=_init(nn.initializers.zeros, ("conv_out",)))


# fairseq: kaiming_normal_ for the feature extractor, torch's default (U +-1/sqrt(fan_in))
# for the data2vec pos conv and the feature projection.
_KAIMING = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
_TORCH_DEFAULT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class ConvLayer(nn.Module):
  """Conv1d (no padding) -> norm -> GELU. norm: layer | group | none (HF names conv, layer_norm)."""
  features: int
  kernel: int
  stride: int
  use_bias: bool
  norm: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = _conv1d(self.features, self.kernel, stride=self.stride, use_bias=self.use_bias,
                kernel_init=_KAIMING, dtype=self.dtype, name="conv")(x)
    if self.norm == "layer":   # fairseq Fp32LayerNorm: statistics in float32
      x = _ln(1e-5, "layer_norm", jnp.float32, axis_name="conv_out")(x.astype(jnp.float32))
    elif self.norm == "group":  # GroupNorm(C, C): each channel over time (wav2vec2 base, layer 0)
      x = nn.GroupNorm(num_groups=self.features, epsilon=1e-5, dtype=jnp.float32,
                       param_dtype=jnp.float32, name="layer_norm",
                       scale_init=_init(nn.initializers.ones, ("conv_out",)),
                       bias_init=_init(nn.initializers.zeros, ("conv_out",)))(x.astype(jnp.float32))
    return nn.gelu(x, approximate=False).astype(self.dtype)


class WeightNormConv(nn.Module):
  """torch weight_norm(Conv1d, dim=2): kernel[k] = g[k] * v[k] / ||v[k]|| per kernel tap."""
  features: int
  kernel: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    cin = x.shape[-1] // self.groups
    std = (4.0 / (self.kernel * self.features)) ** 0.5  # fairseq make_conv_pos
    v = self.param("weight_v", _init(nn.initializers.normal(std), _CONV_AXES),
                   (self.kernel, cin, self.features), jnp.float32)
    g = self.param("weight_g", _init(nn.initializers.constant(std * (cin * self.features) ** 0.5),
                                     ("conv_kernel",)), (self.kernel,), jnp.float32)
    bias = self.param("bias", _init(nn.initializers.zeros, ("conv_out",)), (self.features,), jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=(1, 2), keepdims=True))
    w = (v * (g[:, None, None] / norm)).astype(self.dtype)
    pad = self.kernel // 2
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), w, window_strides=(1,), padding=((pad, pad),),
        dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=self.groups)
    return y + bias.astype(self.dtype)


class AudioEmbed(nn.Module):
  conv_dims: tuple[int, ...]
  conv_kernels: tuple[int, ...]
  conv_strides: tuple[int, ...]
  conv_bias: bool
  conv_norm: str            # layer (every conv layer, data2vec) | group (wav2vec2 base) | none
  hidden: int
  eps: float = 1e-5
  feature_dropout: float = 0.0   # fairseq dropout_input
  feature_grad_mult: float = 1.0  # gradient scale into the conv stack (fairseq GradMultiply)
  pos_conv: str = "data2vec"     # data2vec | wav2vec2
  pos_conv_depth: int = 5
  pos_conv_kernel: int = 19
  pos_conv_groups: int = 16
  alibi: bool = False            # fairseq data2vec 2.0 audio: ALiBi with a learned per-head scale
  heads: int = 1
  dtype: Any = jnp.float32
  num_extra_tokens: int = 0

  def frame_lengths(self, audio_len):
    return conv_output_length(audio_len, self.conv_kernels, self.conv_strides)

  def num_frames(self, num_samples: int) -> int:
    return conv_output_length(int(num_samples), self.conv_kernels, self.conv_strides)

  def setup(self):
    # setattr keeps the parameter names of the HF maps (conv_layers_<i>, pos_conv_<i>).
    for i, (c, k, s) in enumerate(zip(self.conv_dims, self.conv_kernels, self.conv_strides)):
      norm = self.conv_norm if (self.conv_norm != "group" or i == 0) else "none"
      setattr(self, f"conv_layers_{i}", ConvLayer(c, k, s, self.conv_bias, norm, self.dtype))
    self.feature_norm = _ln(self.eps, None, jnp.float32, axis_name="conv_out")
    self.projection = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=jnp.float32,
                               kernel_init=_init(_TORCH_DEFAULT, ("conv_in", "embed")),
                               bias_init=_init(nn.initializers.zeros, ("embed",)))
    self.mask_emb = self.param("mask_emb", _init(nn.initializers.uniform(1.0), ("embed",)),
                               (self.hidden,), jnp.float32)
    self.drop = nn.Dropout(self.feature_dropout)
    k = self.pos_conv_kernel
    if self.pos_conv == "wav2vec2":
      self.pos_conv_0 = WeightNormConv(self.hidden, k, self.pos_conv_groups, self.dtype)
    else:
      for i in range(self.pos_conv_depth):
        setattr(self, f"pos_conv_{i}", _conv1d(
            self.hidden, k, padding=((k // 2, k // 2),), groups=self.pos_conv_groups,
            use_bias=True, kernel_init=_TORCH_DEFAULT, dtype=self.dtype, name=None))
        setattr(self, f"pos_conv_norm_{i}", _ln(1e-5, None, jnp.float32, affine=False))
    if self.alibi:
      # 1-D so optim's no-decay rule (ndim < 2) sees it as fairseq does (alibi_scale: no decay)
      self.alibi_scale = self.param("alibi_scale", _init(nn.initializers.ones, ("heads",)),
                                    (self.heads,), jnp.float32)

  def local(self, batch, *, student: bool = False, deterministic: bool = True):
    """Conv features -> LayerNorm -> projection of the unmasked audio, before dropout (what
    fairseq's teacher reads): (x [B, T, D], valid [B, T]). Computed once per step and shared
    by student and teacher (d2v_jax/objectives.py)."""
    del student, deterministic
    audio = batch["audio"]
    x = audio.astype(self.dtype)[..., None]                              # [B, S, 1]
    for i in range(len(self.conv_dims)):
      x = getattr(self, f"conv_layers_{i}")(x)
    g = self.feature_grad_mult
    if g != 1.0:   # same value, gradient x g (0: a frozen conv stack)
      x = g * x + (1.0 - g) * jax.lax.stop_gradient(x)
    t = x.shape[1]
    lengths = batch["audio_len"] if "audio_len" in batch else jnp.full(audio.shape[:1], audio.shape[1])
    valid = jnp.arange(t)[None, :] < self.frame_lengths(jnp.asarray(lengths, jnp.int32))[:, None]
    x = self.feature_norm(x.astype(jnp.float32))
    x = self.projection(x)
    return constrain(x, "act_batch", "act_length", "act_embed"), valid

  def context(self, x, valid, *, deterministic: bool = True, mask=None, zero_masked: bool = False):
    """Local features -> (dropout) -> masked frames replaced by the mask embedding (or zeroed,
    data2vec 2.0) -> padded frames zeroed -> x + positional conv(x)."""
    x = self.drop(x, deterministic=deterministic)
    if mask is not None:
      fill = jnp.zeros((), x.dtype) if zero_masked else self.mask_emb.astype(x.dtype)
      x = jnp.where(mask[..., None], fill, x)
    x = jnp.where(valid[..., None], x, 0)
    x = constrain(x, "act_batch", "act_length", "act_embed")
    x = x + self._positional(x)
    return constrain(x, "act_batch", "act_length", "act_embed"), valid, self._bias(valid)

  def _bias(self, valid):
    """Key padding [B, 1, 1, T]; with ALiBi the per-example [B, H, T, T] sum of both."""
    if not self.alibi:
      return padding_bias(valid)
    scale = jnp.maximum(self.alibi_scale, 0.0)   # fairseq clamp_min(0)
    return alibi_bias(self.heads, valid.shape[1], scale) + padding_bias(valid)

  def __call__(self, batch, *, student: bool, deterministic: bool):
    x, valid = self.local(batch)
    return self.context(x, valid, deterministic=deterministic,
                        mask=batch["mask"] if student else None)

  def visible(self, x, valid, mask, visible, *, deterministic: bool):
    """data2vec 2.0 student: masked frames zeroed, the positional conv over the whole
    sequence, then only the K visible frames are kept (fairseq encoder_zero_mask)."""
    x, valid, bias = self.context(x, valid, deterministic=deterministic, mask=mask, zero_masked=True)
    x, kept = gather_tokens(x, visible), gather_tokens(valid, visible)
    if self.alibi:   # rows and columns of the kept frames: every pair keeps its true distance
      return x, kept, gather_bias(bias, visible)
    return x, kept, padding_bias(kept)

  def _positional(self, x):
    if self.pos_conv == "wav2vec2":
      y = self.pos_conv_0(x)
      return nn.gelu(y[:, :x.shape[1]], approximate=False)
    y = x
    for i in range(self.pos_conv_depth):
      y = getattr(self, f"pos_conv_{i}")(y)[:, :x.shape[1]]  # even kernels: drop the extra frame
      y = getattr(self, f"pos_conv_norm_{i}")(y.astype(jnp.float32))
      y = nn.gelu(y, approximate=False).astype(self.dtype)
    return y


def build(cfg) -> AudioEmbed:
  m = cfg.model
  return AudioEmbed(
      conv_dims=tuple(int(c) for c in m.conv_dims), conv_kernels=tuple(int(k) for k in m.conv_kernels),
      conv_strides=tuple(int(s) for s in m.conv_strides), conv_bias=bool(m.conv_bias),
      conv_norm=m.conv_norm, hidden=m.encoder.hidden, eps=m.encoder.layer_norm_eps,
      feature_dropout=m.feature_dropout,
      feature_grad_mult=float(m.feature_grad_mult),
      pos_conv=m.pos_conv, pos_conv_depth=m.pos_conv_depth,
      pos_conv_kernel=m.pos_conv_kernel, pos_conv_groups=m.pos_conv_groups,
      alibi=bool(m.alibi), heads=int(m.encoder.heads), dtype=jnp.dtype(cfg.dtype))
