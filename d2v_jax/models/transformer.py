"""The shared Transformer stack (pre-LN and post-LN) used by every modality.

Each block returns, besides its output, the two per-block signals data2vec regresses:
the FFN output before the residual (fairseq `fc_result` / `layer_result`, text and audio)
and the end-of-block output (data2vec_vision). Only the one the config asks for is stacked,
so the teacher does not keep L copies of both.

Parameter and activation axes carry logical names; d2v_jax/sharding.py maps them to mesh
axes. Parameter names mirror the HF modules so the maps in d2v_jax/hf/ stay one-to-one.

Attention has interchangeable implementations (`model.encoder.attention`):
d2v_jax/models/attention.py.

Activation rematerialisation (`model.encoder.remat`, see `remat_policy`) works on names the
block gives its projections (jax.ad_checkpoint.checkpoint_name), MaxText style.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from d2v_jax.models import attention, cpu_ops
from d2v_jax.models.attention import (AttentionFeatures, attend, attention_platform, bias_kind,
                                      select_attention)

INIT = nn.initializers.normal(0.02)   # BERT / fairseq init_bert_params


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
  scan_unroll: int = 0      # layers per scan iteration; 0: cpu_ops.unroll (all on CPU, 1 elsewhere)
  remat: str = "none"       # REMAT_POLICIES (or the alias "dots")
  attention: str = "auto"   # ATTENTION_IMPLS; see select_attention
  key_padding: str = "any"  # "right": a [B,1,1,T] padding bias always hides a suffix of keys
  platform: str = ""        # what the model is built for (build.py: the mesh's); "" = default backend
  dtype: Any = jnp.float32

  @property
  def on_cpu(self) -> bool:
    """Built for a CPU mesh: the CPU-only forms of models/cpu_ops.py."""
    return cpu_ops.platform(self.platform) == "cpu"

  @classmethod
  def from_config(cls, enc, dtype: str = "float32", platform: str = "") -> "EncoderSpec":
    fields = {f.name for f in dataclasses.fields(cls)} - {"dtype", "platform"}
    return cls(**{k: enc[k] for k in fields if k in enc}, dtype=jnp.dtype(dtype), platform=platform)


def gelu(x):
  """Exact GELU, x * Phi(x), in the erf form PyTorch / HF use (jax.nn.gelu's erfc form is
  ~6x slower on XLA:CPU; the two differ by < 5e-7 absolute in float32)."""
  return x * 0.5 * (1.0 + jax.lax.erf(x * np.asarray(0.7071067811865476, x.dtype)))


def dense(features: int, axes: tuple[str, str], name: str, dtype, use_bias: bool = True,
          cpu: bool = False) -> nn.Dense:
  return cpu_ops.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name, cpu=cpu,
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
  return jnp.where(valid, 0.0, attention.NEG_INF)[:, None, None, :].astype(jnp.float32)


# -------------------------------------------------------------- attention implementations


# ------------------------------------------------------------------------ remat policies

REMAT_POLICIES = ("none", "full", "minimal", "save_dots", "save_qkv_out", "offload")
REMAT_ALIASES = {"dots": "save_dots"}
# Names the block gives its activations (checkpoint_name): the q / k / v projections, the
# attention context (before the output projection), the output projection, the MLP's input
# projection (before GELU, "wi") and output projection ("wo").
PROJECTIONS = ("query_proj", "key_proj", "value_proj", "context", "out_proj", "mlpwi", "mlpwo")


def remat_policy(name: str):
  """model.encoder.remat -> (canonical name, jax checkpoint policy; None = no remat).

    none          keep every activation the backward pass needs (fastest, most memory)
    full          keep only each block's input; recompute the whole block
    minimal       keep the PROJECTIONS outputs (no [B, H, T, T] attention tensors);
                  recompute layer norms, GELU, dropout and the attention scores
    save_dots     keep the output of every matmul, attention scores included ("dots")
    save_qkv_out  keep q, k, v and the attention output projection; recompute the MLP too
    offload       as minimal, but the kept projections go to pinned host memory
  """
  canon = REMAT_ALIASES.get(name, name)
  cp = jax.checkpoint_policies
  policies = {
      "none": None,
      "full": cp.nothing_saveable,
      "minimal": cp.save_only_these_names(*PROJECTIONS),
      "save_dots": cp.checkpoint_dots,
      "save_qkv_out": cp.save_only_these_names("query_proj", "key_proj", "value_proj", "out_proj"),
      "offload": cp.save_and_offload_only_these_names(
          names_which_can_be_saved=[], names_which_can_be_offloaded=list(PROJECTIONS),
          offload_src="device", offload_dst="pinned_host"),
  }
  if canon not in policies:
    raise ValueError(f"model.encoder.remat={name!r}; use one of {REMAT_POLICIES} "
                     f"(or {sorted(REMAT_ALIASES)})")
  return canon, policies[canon]


class Attention(nn.Module):
  spec: EncoderSpec

  @nn.compact
  def __call__(self, x, bias, deterministic: bool):
    s = self.spec
    head_dim = s.hidden // s.heads
    cpu = s.on_cpu
    q = checkpoint_name(dense(s.hidden, ("embed", "heads"), "query", s.dtype, cpu=cpu)(x), "query_proj")
    k = checkpoint_name(dense(s.hidden, ("embed", "heads"), "key", s.dtype, use_bias=s.key_bias,
                              cpu=cpu)(x), "key_proj")
    v = checkpoint_name(dense(s.hidden, ("embed", "heads"), "value", s.dtype, cpu=cpu)(x), "value_proj")
    split = lambda t: t.reshape(t.shape[:-1] + (s.heads, head_dim))
    q, k, v = split(q), split(k), split(v)
    q = constrain(q, "act_batch", "act_length", "act_heads", None)
    features = AttentionFeatures(bias_kind(None if bias is None else bias.shape),
                                 s.attention_dropout > 0 and not deterministic,
                                 jnp.dtype(s.dtype).name, head_dim)
    impl, _ = select_attention(s.attention, attention_platform(s), features)
    dropout = None
    if impl == "xla":
      drop = nn.Dropout(s.attention_dropout)
      dropout = lambda p: drop(p, deterministic=deterministic)
    out = attend(q, k, v, bias, impl=impl, dropout=dropout, key_padding=s.key_padding)
    out = checkpoint_name(out.reshape(x.shape[:-1] + (s.hidden,)), "context")
    return checkpoint_name(dense(s.hidden, ("heads", "embed"), "out", s.dtype, cpu=cpu)(out), "out_proj")


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
      h = checkpoint_name(dense(s.mlp_dim, ("embed", "mlp"), "fc1", s.dtype, cpu=s.on_cpu)(h), "mlpwi")
      h = gelu(h)
      h = constrain(h, "act_batch", "act_length", "act_mlp")
      h = nn.Dropout(s.activation_dropout)(h, deterministic=deterministic)
      return checkpoint_name(dense(s.hidden, ("mlp", "embed"), "fc2", s.dtype, cpu=s.on_cpu)(h), "mlpwo")

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
    s = self.spec
    return cpu_ops.unroll(cpu_ops.platform(s.platform), s.num_layers, s.scan_unroll,
                          remat_policy(s.remat)[0] != "none")

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
    _, policy = remat_policy(s.remat)
    if policy is not None:
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
