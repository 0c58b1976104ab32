"""data2vec 2.0 lightweight conv decoders (docs/algorithm.md §3.5, §3.9; fairseq `Decoder1d` /
`Decoder2d`).

Input: the student's encoder output scattered back to the full sequence, with N(0, noise_std)
vectors at the masked positions and no position information (Data2Vec.student_v2 in
d2v_jax/models/data2vec.py builds it). Each block: Conv (kernel k, 'same' padding, `groups`)
-> LayerNorm over channels without affine -> GELU, plus the block's input when `residual` and
the channel counts match (so a decoder narrower than the encoder skips the residual of its
first block). Then `proj`:
Linear(dim -> width), or Linear(dim -> dim * ratio) -> GELU -> Linear(-> width) for
`proj_layers` = 2 (text). Initialisation is PyTorch's default for Conv / Linear: fairseq
re-initialises the audio and image decoders after init_bert_params; its text decoder keeps
init_bert_params' N(0, 0.02) Linear weights (zero bias), which `proj_init="bert"` gives.

Decoder1d convolves over the sequence [N, T, C]; Decoder2d over the patch grid [N, g, g, C]
(vision, T = g * g row-major patches).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from d2v_jax.models import cpu_ops
from d2v_jax.models.transformer import gelu

# torch.nn.Conv / Linear default: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)); the bias too.
_TORCH_KERNEL = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_bias(fan_in: int):
  bound = fan_in ** -0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def grouped_conv(x, kernel, groups: int, impl: str = "xla"):
  """Stride-1 'same' convolution of x [N, *S, C_in] with kernel [*K, C_in / groups, C_out]
  (nn.Conv's layout), 1-D or 2-D: d2v_jax/models/cpu_ops.py (impl xla, or cpu: the CPU forms,
  what a model built for a CPU mesh uses)."""
  if kernel.ndim == 3:
    k = kernel.shape[0]
    return cpu_ops.conv1d(x, kernel, (k // 2, k // 2), groups, impl)
  return cpu_ops.conv2d(x, kernel, groups, impl)


class Conv(nn.Module):
  """nn.Conv's parameters (kernel [*window, C_in / groups, features], bias), stride 1, 'same'
  padding for odd kernels, computed with `grouped_conv`."""
  features: int
  window: tuple
  groups: int
  fan_in: int
  dtype: Any = jnp.float32
  impl: str = "xla"

  @nn.compact
  def __call__(self, x):
    cin = x.shape[-1]
    axes = (None,) * len(self.window) + (None, "embed")
    kernel = self.param("kernel", nn.with_logical_partitioning(_TORCH_KERNEL, axes),
                        (*self.window, cin // self.groups, self.features), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(_torch_bias(self.fan_in), ("embed",)),
                      (self.features,), jnp.float32)
    y = grouped_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.groups, self.impl)
    return y + bias.astype(self.dtype)


class ConvDecoder(nn.Module):
  """Decoder1d (grid=0) or Decoder2d (grid=g): see the module docstring."""
  dim: int
  width: int                 # output width = encoder width (the targets' D)
  kernel: int
  groups: int
  layers: int
  residual: bool
  proj_layers: int = 1
  proj_ratio: float = 2.0
  input_dropout: float = 0.0
  proj_init: str = "torch"   # torch: U(+-1/sqrt(fan_in)) | bert: N(0, 0.02), bias 0
  grid: int = 0
  dtype: Any = jnp.float32
  conv_impl: str = "xla"     # grouped_conv's impl: cpu_ops.impl_for(the build platform)

  @nn.compact
  def __call__(self, x, deterministic: bool):
    """x [N, T, C_in] -> predictions [N, T, width]."""
    n, t, _ = x.shape
    x = nn.Dropout(self.input_dropout)(x, deterministic=deterministic).astype(self.dtype)
    if self.grid:
      if self.grid * self.grid != t:
        raise ValueError(f"Decoder2d: {t} positions are not a {self.grid} x {self.grid} grid")
      x = x.reshape(n, self.grid, self.grid, x.shape[-1])
    k = self.kernel
    window = (k, k) if self.grid else (k,)
    for i in range(self.layers):
      cin = x.shape[-1]
      fan_in = cin // self.groups * k ** len(window)
      y = Conv(self.dim, window, self.groups, fan_in, dtype=self.dtype, impl=self.conv_impl,
               name=f"conv_{i}")(x)
      y = nn.LayerNorm(epsilon=1e-5, use_scale=False, use_bias=False, dtype=jnp.float32,
                       name=f"norm_{i}")(y.astype(jnp.float32))
      y = gelu(y).astype(self.dtype)
      x = x + y if (self.residual and cin == self.dim) else y
    x = x.reshape(n, t, self.dim)
    cur = self.dim
    for i in range(self.proj_layers - 1):
      nxt = int(cur * self.proj_ratio) if i == 0 else cur
      x = gelu(self._linear(nxt, cur, f"proj_{i}")(x))
      cur = nxt
    return self._linear(self.width, cur, "proj")(x)

  def _linear(self, features: int, fan_in: int, name: str) -> nn.Dense:
    if self.proj_init == "bert":
      kernel, bias = nn.initializers.normal(0.02), nn.initializers.zeros
    elif self.proj_init == "torch":
      kernel, bias = _TORCH_KERNEL, _torch_bias(fan_in)
    else:
      raise ValueError(f"v2.decoder.proj_init={self.proj_init!r}: use torch or bert")
    return nn.Dense(features, dtype=self.dtype, param_dtype=jnp.float32, name=name,
                    kernel_init=nn.with_logical_partitioning(kernel, (None, "embed")),
                    bias_init=nn.with_logical_partitioning(bias, ("embed",)))


def build(cfg, grid: int = 0, platform: str = "") -> ConvDecoder:
  """The decoder of cfg, for a model built for `platform` (the mesh's; "" = jax's default)."""
  d = cfg.v2.decoder
  return ConvDecoder(dim=int(d.dim), width=int(cfg.model.encoder.hidden), kernel=int(d.kernel),
                     groups=int(d.groups), layers=int(d.layers), residual=bool(d.residual),
                     proj_layers=int(d.proj_layers), proj_ratio=float(d.proj_ratio),
                     input_dropout=float(d.input_dropout), proj_init=str(d.proj_init), grid=grid,
                     dtype=jnp.dtype(cfg.dtype), conv_impl=cpu_ops.impl_for(platform))
