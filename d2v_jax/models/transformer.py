"""The shared Transformer stack (pre-LN and post-LN) used by every modality.

Each block returns, besides its output, the two per-block signals data2vec regresses:
the FFN output before the residual (fairseq `fc_result` / `layer_result`, text and audio)
and the end-of-block output (data2vec_vision). Only the one the config asks for is stacked,
so the teacher does not keep L copies of both.

Parameter and activation axes carry logical names; d2v_jax/sharding.py maps them to mesh
axes. Parameter names mirror the HF modules so the maps in d2v_jax/hf/ stay one-to-one.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INIT = nn.initializers.normal(0.02)   # BERT / fairseq init_bert_params
NEG_INF = -1e9  # finite, so fully padded rows stay NaN-free in float32 and bfloat16


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  """Hashable copy of config.model.encoder (Flax module attributes must be hashable)."""
  num_layers: int
  hidden: int
  heads: int
  mlp_dim: int
  pre_ln: bool = False
  layer_norm_eps: float = 1e-5
  dropout: float = 0.1
  attention_dropout: float = 0.1
  activation_dropout: float = 0.0
  drop_path: float = 0.0
  layerdrop: float = 0.0
  layer_scale: float = 0.0
  key_bias: bool = True
  input_norm: bool = False
  final_norm: bool = False
  scan: bool = True
  scan_unroll: int = 0      # layers per scan iteration; 0: all of them on CPU, 1 elsewhere
  remat: str = "none"
  dtype: Any = jnp.float32

  @classmethod
  def from_config(cls, enc, dtype: str = "float32") -> "EncoderSpec":
    fields = {f.name for f in dataclasses.fields(cls)} - {"dtype"}
    return cls(**{k: enc[k] for k in fields if k in enc}, dtype=jnp.dtype(dtype))


def _dw_transposed(x2, g2):
  """x2 [M, K], g2 [M, N] -> x2^T g2 [K, N] with the smaller operand transposed explicitly
  (XLA:CPU otherwise transposes the larger one for a dot with a transposed lhs). The
  barriers keep XLA from folding the transposes back into the dot. Measured against the
  plain dot on the 2-core bench machine (docs/performance.md): vision small 3.8 % faster,
  text small 2 % slower; kept for the vision gain, worth re-measuring per machine."""
  k, n = x2.shape[1], g2.shape[1]
  if k <= n:
    return jnp.dot(jax.lax.optimization_barrier(x2.T), g2)
  return jax.lax.optimization_barrier(jnp.dot(jax.lax.optimization_barrier(g2.T), x2)).T


def _dw_plain(x2, g2):
  return jnp.dot(x2.T, g2)


@jax.custom_vjp
def matmul(x, w):
  """x [..., K] @ w [K, N]; the same product as nn.Dense, with a CPU-friendly weight gradient."""
  return jnp.dot(x, w)


def _matmul_fwd(x, w):
  return jnp.dot(x, w), (x, w)


def _matmul_bwd(res, g):
  x, w = res
  k, n = w.shape
  dx = jnp.dot(g, w.T).astype(x.dtype)
  x2, g2 = x.reshape(-1, k), g.reshape(-1, n)
  dw = jax.lax.platform_dependent(x2, g2, cpu=_dw_transposed, default=_dw_plain)
  return dx, dw.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Dense(nn.Dense):
  """nn.Dense (same parameters, initialisers and dtype promotion) computed with `matmul`."""

  @nn.compact
  def __call__(self, inputs):
    kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features),
                        self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    y = matmul(inputs, kernel)
    if bias is not None:
      y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


def _conv1d(x, w, pad: tuple[int, int], groups: int):
  return jax.lax.conv_general_dilated(x, w, (1,), (pad,), dimension_numbers=("NWC", "WIO", "NWC"),
                                      feature_group_count=groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv1d_same_stride(x, w, pad: tuple[int, int], groups: int):
  """Stride-1 (grouped) 1-D convolution, x [B, T, Cin] (NWC), w [K, Cin/groups, Cout] (WIO).

  The gradients are computed as forward convolutions: XLA:CPU's own backward of a grouped
  convolution (an lhs-dilated / batch-grouped conv) is ~5x slower than its forward; this
  one is ~4.6x faster than XLA's (data2vec-audio's positional conv, docs/performance.md)."""
  return _conv1d(x, w, pad, groups)


def _conv1d_fwd(x, w, pad, groups):
  return _conv1d(x, w, pad, groups), (x, w)


def _conv1d_bwd(pad, groups, res, gy):
  x, w = res
  k, cg, cout = w.shape
  og = cout // groups
  lo, hi = pad
  # dx: correlate gy with the time-flipped kernel, in/out channels swapped within each group.
  wt = jnp.flip(w.reshape(k, cg, groups, og), 0).transpose(0, 3, 2, 1).reshape(k, og, groups * cg)
  dx = _conv1d(gy, wt.astype(gy.dtype), (k - 1 - lo, k - 1 - hi), groups)
  # dw[k, c, g*og + o] = sum_{b,t} xpad[b, t + k, g*cg + c] * gy[b, t, g*og + o]: a grouped
  # forward conv over time with batch and channels swapped (window = output length).
  b, t_out = gy.shape[0], gy.shape[1]
  xp = jnp.pad(x, ((0, 0), (lo, hi), (0, 0)))
  lhs = xp.reshape(b, xp.shape[1], groups, cg).transpose(3, 1, 2, 0).reshape(cg, xp.shape[1], groups * b)
  rhs = gy.reshape(b, t_out, groups, og).transpose(1, 0, 2, 3).reshape(t_out, b, groups * og)
  dw = _conv1d(lhs, rhs.astype(lhs.dtype), (0, 0), groups).transpose(1, 0, 2)
  return dx.astype(x.dtype), dw.astype(w.dtype)


conv1d_same_stride.defvjp(_conv1d_fwd, _conv1d_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1, precision=None,
                         **kw):
  """Drop-in for lax.conv_general_dilated (nn.Conv(conv_general_dilated=...)): 1-D stride-1
  undilated NWC/WIO convolutions take `conv1d_same_stride`, everything else lax."""
  nwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NWC", "WIO", "NWC"))
  dn = dimension_numbers
  if dn is not None and not isinstance(dn, jax.lax.ConvDimensionNumbers):
    dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dn)
  simple = (lhs.ndim == 3 and tuple(window_strides) == (1,) and not isinstance(padding, str)
            and all(d in (None, 1) for d in tuple(lhs_dilation or (1,)) + tuple(rhs_dilation or (1,)))
            and (dn is None or dn == nwc) and precision is None and not kw
            and kw.get("batch_group_count", 1) == 1)
  if not simple:
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision, **kw)
  (lo, hi), = padding
  return conv1d_same_stride(lhs, rhs, (int(lo), int(hi)), int(feature_group_count))


def gelu(x):
  """Exact GELU, x * Phi(x), in the erf form PyTorch / HF use (jax.nn.gelu's erfc form is
  ~6x slower on XLA:CPU; the two differ by < 5e-7 absolute in float32)."""
  return x * 0.5 * (1.0 + jax.lax.erf(x * np.asarray(0.7071067811865476, x.dtype)))


def dense(features: int, axes: tuple[str, str], name: str, dtype, use_bias: bool = True) -> nn.Dense:
  return Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
      kernel_init=nn.with_logical_partitioning(INIT, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)))


def layer_norm(eps: float, name: str, dtype=jnp.float32, affine: bool = True) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name,
      use_scale=affine, use_bias=affine,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


def constrain(x: jax.Array, *axes: str | None) -> jax.Array:
  return nn.with_logical_constraint(x, axes)


def padding_bias(valid: jax.Array | None) -> jax.Array | None:
  """[B, T] bool -> additive attention bias [B, 1, 1, T] that hides padded keys."""
  if valid is None:
    return None
  return jnp.where(valid, 0.0, NEG_INF)[:, None, None, :].astype(jnp.float32)


class Attention(nn.Module):
  spec: EncoderSpec

  @nn.compact
  def __call__(self, x, bias, deterministic: bool):
    s = self.spec
    head_dim = s.hidden // s.heads
    q = dense(s.hidden, ("embed", "heads"), "query", s.dtype)(x)
    k = dense(s.hidden, ("embed", "heads"), "key", s.dtype, use_bias=s.key_bias)(x)
    v = dense(s.hidden, ("embed", "heads"), "value", s.dtype)(x)
    split = lambda t: t.reshape(t.shape[:-1] + (s.heads, head_dim))
    q, k, v = split(q), split(k), split(v)
    q = constrain(q, "act_batch", "act_length", "act_heads", None)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(head_dim).astype(jnp.float32)
    if bias is not None:
      logits = logits + bias
    probs = jax.nn.softmax(logits, axis=-1)
    probs = nn.Dropout(s.attention_dropout)(probs, deterministic=deterministic).astype(s.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape[:-1] + (s.hidden,))
    return dense(s.hidden, ("heads", "embed"), "out", s.dtype)(out)


class Block(nn.Module):
  """One Transformer block. Returns (output, (ffn_output, end_of_block_output))."""
  spec: EncoderSpec

  def _scale(self, name: str, y):
    s = self.spec
    if s.layer_scale <= 0:
      return y
    init = nn.with_logical_partitioning(nn.initializers.constant(s.layer_scale), ("embed",))
    return y * self.param(name, init, (s.hidden,), jnp.float32).astype(y.dtype)

  def _drop_path(self, y, rate, deterministic: bool):
    if deterministic or self.spec.drop_path <= 0:
      return y
    keep = 1.0 - rate
    u = jax.random.uniform(self.make_rng("dropout"), (y.shape[0],) + (1,) * (y.ndim - 1))
    return jnp.where(u < keep, y / keep, 0).astype(y.dtype)

  @nn.compact
  def __call__(self, x, bias, deterministic: bool, drop_path_rate):
    s = self.spec
    drop = lambda y: nn.Dropout(s.dropout)(y, deterministic=deterministic)
    ln = lambda name: layer_norm(s.layer_norm_eps, name, s.dtype)

    def ffn(h):
      h = dense(s.mlp_dim, ("embed", "mlp"), "fc1", s.dtype)(h)
      h = gelu(h)
      h = constrain(h, "act_batch", "act_length", "act_mlp")
      h = nn.Dropout(s.activation_dropout)(h, deterministic=deterministic)
      return dense(s.hidden, ("mlp", "embed"), "fc2", s.dtype)(h)

    attn = Attention(s, name="attention")
    if s.pre_ln:
      h = x + self._drop_path(self._scale("lambda_1", drop(attn(ln("attn_norm")(x), bias, deterministic))),
                              drop_path_rate, deterministic)
      f = ffn(ln("mlp_norm")(h))
      out = h + self._drop_path(self._scale("lambda_2", drop(f)), drop_path_rate, deterministic)
    else:
      h = ln("attn_norm")(x + drop(attn(x, bias, deterministic)))
      f = ffn(h)
      out = ln("mlp_norm")(h + drop(f))
    out = constrain(out, "act_batch", "act_length", "act_embed")
    return out, (f, out)


class _ScanBlock(nn.Module):
  """Block in scan form: carry = hidden state, per-layer input = (index, layerdrop draw)."""
  spec: EncoderSpec
  collect: str
  deterministic: bool

  @nn.compact
  def __call__(self, x, layer_in, bias):
    idx, skip = layer_in
    rate = self.spec.drop_path * idx / max(self.spec.num_layers - 1, 1)
    y, (ffn, end) = Block(self.spec, name="block")(x, bias, self.deterministic, rate)
    y = jnp.where(skip, x, y)
    return y, (ffn if self.collect == "ffn" else end)


class Encoder(nn.Module):
  """Stack of `num_layers` blocks.

  Returns (final hidden state [B, T, D], per-layer outputs [L, B, T, D]) where the per-layer
  output is the FFN output (`collect="ffn"`) or the end-of-block output (`collect="end"`).
  """
  spec: EncoderSpec
  collect: str = "ffn"

  def _unroll(self) -> int:
    """Scan iterations to unroll: on CPU an unrolled stack avoids the loop's stacked residual
    buffers and copies (text / vision small steps 1.19x / 1.18x faster, docs/performance.md)
    and keeps the stacked parameter layout. Not with remat: unrolled, XLA's common
    subexpression elimination merges the recomputation back and nothing is saved."""
    n = self.spec.num_layers
    if self.spec.scan_unroll > 0:
      return min(self.spec.scan_unroll, n)
    return n if jax.default_backend() == "cpu" and self.spec.remat == "none" else 1

  @nn.compact
  def __call__(self, x, bias, deterministic: bool):
    s = self.spec
    if s.input_norm:
      x = layer_norm(s.layer_norm_eps, "input_norm", s.dtype)(x)
      x = nn.Dropout(s.dropout)(x, deterministic=deterministic)
    x = constrain(x.astype(s.dtype), "act_batch", "act_length", "act_embed")
    idx = jnp.arange(s.num_layers, dtype=jnp.float32)
    if deterministic or s.layerdrop <= 0:
      skip = jnp.zeros((s.num_layers,), bool)
    else:
      skip = jax.random.uniform(self.make_rng("dropout"), (s.num_layers,)) < s.layerdrop

    block_cls = _ScanBlock
    if s.remat != "none":
      policy = (jax.checkpoint_policies.checkpoint_dots if s.remat == "dots"
                else jax.checkpoint_policies.nothing_saveable)
      block_cls = nn.remat(_ScanBlock, static_argnums=(), policy=policy)
    if s.scan:
      scanned = nn.scan(
          block_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
          in_axes=(0, nn.broadcast), length=s.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"}, unroll=self._unroll())
      x, outs = scanned(s, self.collect, deterministic, name="layers")(x, (idx, skip), bias)
    else:
      outs = []
      for i in range(s.num_layers):
        x, o = block_cls(s, self.collect, deterministic, name=f"layers_{i}")(x, (idx[i], skip[i]), bias)
        outs.append(o)
      outs = jnp.stack(outs)
    if s.final_norm:
      x = layer_norm(s.layer_norm_eps, "final_norm", s.dtype)(x)
    return x, outs
