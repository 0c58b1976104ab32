"""Attention implementations of the Transformer stack (`model.encoder.attention`, see
`select_attention`): the XLA einsum/softmax path (supports everything: any additive bias,
padding, attention dropout, any dtype), cuDNN fused attention through
`jax.nn.dot_product_attention(implementation="cudnn")` (GPU, bf16/fp16) and the Pallas TPU
flash-attention kernel. `auto` takes the fastest one that supports the call's features;
attention dropout > 0 keeps the XLA path, so `attention_dropout=0` is how a run gets fused
kernels (the teacher's forward, which has no dropout, gets them either way).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d2v_jax.models import cpu_ops

NEG_INF = -1e9  # finite, so fully padded rows stay NaN-free in float32 and bfloat16

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas")
BIAS_KINDS = ("none", "padding", "shared", "per_example")
CUDNN_MAX_HEAD_DIM = 128   # cuDNN flash attention: <= 128 before Hopper (256 from Hopper on)
PALLAS_BLOCK = 128         # the Pallas TPU kernel's sequence tile; lengths are padded to it


def bias_kind(bias_shape) -> str:
  """What an attention bias is, from its (static) shape alone:
  none; padding = [B|1, 1, 1, T]: a key-padding mask, 0 or NEG_INF as `padding_bias` makes
  it (the fused paths turn it into key lengths / segment ids, so other values are not
  allowed in this shape); shared = [1, H|1, T|1, T]: one additive bias for every example
  (relative position bias, ALiBi); per_example = any other [B, H|1, T|1, T]."""
  if bias_shape is None:
    return "none"
  b, h, q, _ = bias_shape
  if h == 1 and q == 1:
    return "padding"
  return "shared" if b == 1 else "per_example"


@dataclasses.dataclass(frozen=True)
class AttentionFeatures:
  """What one attention call needs from an implementation."""
  bias: str = "none"        # BIAS_KINDS
  dropout: bool = False     # attention dropout active in this call (rate > 0, not deterministic)
  dtype: str = "float32"    # compute dtype
  head_dim: int = 64


def _cudnn_unsupported(f: AttentionFeatures) -> str | None:
  if f.dtype not in ("bfloat16", "float16"):
    return f"dtype {f.dtype}: cuDNN takes bfloat16 / float16"
  if f.dropout:
    return "attention dropout > 0"
  if f.head_dim % 8 or f.head_dim > CUDNN_MAX_HEAD_DIM:
    return f"head dim {f.head_dim}: cuDNN takes a multiple of 8, at most {CUDNN_MAX_HEAD_DIM}"
  if f.bias == "per_example":
    return "a per-example additive bias: cuDNN's bias gradient needs one bias for the batch"
  return None


def _pallas_unsupported(f: AttentionFeatures, auto: bool) -> str | None:
  if f.dropout:
    return "attention dropout > 0"
  if auto and f.bias in ("shared", "per_example"):
    return "an additive bias: the Pallas kernel would read it as a full [B, H, T, T] array"
  return None


def select_attention(requested: str, platform: str, features: AttentionFeatures) -> tuple[str, str]:
  """(implementation, why) for one attention call. A pure function of the config value, the
  platform ("cpu" | "gpu" | "tpu"; "rocm" = a non-CUDA GPU) and the call's features:

    platform  auto picks                                      unless (then xla)
    gpu       cudnn (jax.nn.dot_product_attention)            dtype float32, attention dropout,
                                                              head dim > 128 or not /8,
                                                              a per-example additive bias
    tpu       pallas (Pallas TPU flash attention)             attention dropout, any additive
                                                              bias (relative position, ALiBi)
    cpu/rocm  xla                                             -

  Padding masks are supported by both fused paths (cuDNN: key lengths; Pallas: segment ids).
  An explicit `cudnn` / `pallas` that the call or platform does not support is an error (a
  config asking for a kernel never silently gets another); `xla` supports everything."""
  if requested not in ATTENTION_IMPLS:
    raise ValueError(f"model.encoder.attention={requested!r}; use one of {ATTENTION_IMPLS}")
  if requested == "xla":
    return "xla", "requested"
  if requested in ("cudnn", "pallas"):
    want = {"cudnn": "gpu", "pallas": "tpu"}[requested]
    if platform != want:
      raise ValueError(f"model.encoder.attention={requested} needs a {want.upper()} "
                       f"(platform: {platform}); use auto or xla")
    why = _cudnn_unsupported(features) if requested == "cudnn" else _pallas_unsupported(features, False)
    if why:
      raise ValueError(f"model.encoder.attention={requested} does not support {why}; use auto "
                       f"or xla" + ("; attention_dropout=0 allows fused kernels" if features.dropout else ""))
    return requested, "requested"
  if platform == "gpu":
    why = _cudnn_unsupported(features)
    return ("xla", why) if why else ("cudnn", "cuDNN fused attention")
  if platform == "tpu":
    why = _pallas_unsupported(features, True)
    return ("xla", why) if why else ("pallas", "Pallas flash attention")
  return "xla", f"no fused attention kernel on {platform}"


def attention_platform(spec) -> str:
  """spec.platform, else the backend jax lowers for by default ("rocm" for a non-CUDA GPU)."""
  return cpu_ops.platform(spec.platform)


def describe_attention(spec, platform: str | None = None, bias: str | None = None) -> str:
  """One line for the trainer's start-up output: which attention implementation the teacher
  (no dropout) and the student (attention dropout when > 0) use, and why. `bias` is the
  modality's bias kind (BIAS_KINDS: text / audio "padding", vision "shared"); without it the
  choice is given per kind where the kinds differ."""
  platform = platform or attention_platform(spec)
  dtype = jnp.dtype(spec.dtype).name
  kinds = (bias,) if bias else ("none", "padding", "shared", "per_example")
  parts = []
  for role, dropout in (("teacher", False), ("student", spec.attention_dropout > 0)):
    groups: dict = {}
    for kind in kinds:
      f = AttentionFeatures(kind, dropout, dtype, spec.hidden // spec.heads)
      try:
        impl, why = select_attention(spec.attention, platform, f)
      except ValueError as e:
        impl, why = "error", str(e)
      groups.setdefault((impl, why), []).append(kind)
    note = lambda impl, why: f" ({why})" if impl in ("xla", "error") and why != "requested" else ""
    if len(groups) == 1:
      (impl, why), = groups
      parts.append(f"{role} {impl}{note(impl, why)}")
    else:
      parts.append(f"{role} " + ", ".join(f"{impl} for {'/'.join(ks)} bias{note(impl, why)}"
                                           for (impl, why), ks in groups.items()))
  hint = ""
  if spec.attention_dropout > 0 and platform in ("gpu", "tpu"):
    hint = "; attention_dropout=0 would give the student the fused kernel too"
  return (f"attention={spec.attention} on {platform} ({dtype}, head dim "
          f"{spec.hidden // spec.heads}): " + "; ".join(parts) + hint)


def softmax_lowp(logits, bias, scale: float):
  """softmax(logits * scale + bias) over the last axis for low-precision (bf16) logits: the
  max / sum statistics are float32 inside the fusion, the probabilities are returned (and
  kept for the backward pass, the only residual) in the logits' dtype, so no float32
  [B, H, T, T] tensor is stored. `bias` (float32, broadcastable) gets its gradient in its
  own dtype."""
  meta = None if bias is None else (tuple(bias.shape), jnp.dtype(bias.dtype))
  return _softmax_lowp(logits, bias, scale, meta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _softmax_lowp(logits, bias, scale, meta):
  return _softmax_lowp_fwd(logits, bias, scale, meta)[0]


def _softmax_lowp_fwd(logits, bias, scale, meta):
  x = logits.astype(jnp.float32) * scale
  if bias is not None:
    x = x + bias.astype(jnp.float32)
  e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
  p = (e / jnp.sum(e, axis=-1, keepdims=True)).astype(logits.dtype)
  return p, p


def _softmax_lowp_bwd(scale, meta, p, g):
  pf = p.astype(jnp.float32)
  gp = g.astype(jnp.float32) * pf
  dx = gp - pf * jnp.sum(gp, axis=-1, keepdims=True)
  dbias = None
  if meta is not None:
    shape, dtype = meta
    axes = tuple(i for i, (nb, nx) in enumerate(zip(shape, dx.shape)) if nb == 1 and nx != 1)
    dbias = jnp.sum(dx, axis=axes, keepdims=True).astype(dtype)
  return (dx * scale).astype(p.dtype), dbias


_softmax_lowp.defvjp(_softmax_lowp_fwd, _softmax_lowp_bwd)


def _attend_xla(q, k, v, bias, dropout):
  """The reference path: einsum, softmax, dropout, einsum. float32: exactly the original
  computation (the HF parity tests rely on it); bf16/fp16: `softmax_lowp`."""
  head_dim = q.shape[-1]
  if q.dtype == jnp.float32:
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(head_dim).astype(jnp.float32)
    if bias is not None:
      logits = logits + bias
    probs = jax.nn.softmax(logits, axis=-1)
  else:
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    probs = softmax_lowp(logits, bias, float(1.0 / np.sqrt(head_dim)))
  if dropout is not None:
    probs = dropout(probs)
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(q.dtype), v)


def _key_valid(bias, batch: int, length: int):
  """[B|1, 1, 1, T] padding bias -> [B, T] bool (True = a real key)."""
  return jnp.broadcast_to(bias[:, 0, 0, :] > NEG_INF / 2, (batch, length))


def _attend_dpa(q, k, v, bias, key_padding: str, implementation: str):
  """jax.nn.dot_product_attention (cuDNN on GPU; implementation="xla" runs the same padding
  logic on any backend, which is how the CPU tests check it). A padding bias becomes key
  lengths: with key_padding="right" directly, otherwise after a stable per-row sort that puts
  the real keys first (attention is invariant to the order of keys, so this is exact for any
  padding layout). cuDNN trains with a bias only on even lengths: an odd T gets one more,
  hidden, position."""
  b, t, h, _ = q.shape
  kind = bias_kind(None if bias is None else bias.shape)
  q_len = kv_len = None
  if kind == "padding":
    valid = _key_valid(bias, b, t)
    if key_padding != "right":
      order = jnp.argsort(~valid, axis=1, stable=True)[:, :, None, None]
      k, v = jnp.take_along_axis(k, order, axis=1), jnp.take_along_axis(v, order, axis=1)
    # >= 1: a row with no real key attends to its first (padded) one instead of producing NaN
    kv_len = jnp.maximum(jnp.sum(valid, axis=1, dtype=jnp.int32), 1)
    bias = None
  elif bias is not None:
    bias = jnp.broadcast_to(bias, (bias.shape[0], h, t, t)).astype(q.dtype)
    if t % 2:
      q, k, v = (jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0))) for x in (q, k, v))
      bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 1), (0, 1)))
      q_len = kv_len = jnp.full((b,), t, jnp.int32)
  out = jax.nn.dot_product_attention(q, k, v, bias, query_seq_lengths=q_len,
                                     key_value_seq_lengths=kv_len, implementation=implementation)
  return out[:, :t]


def _pallas_block(length: int) -> int:
  return next(blk for blk in (512, 256, 128) if length % blk == 0)


def _mesh_spec(mesh, shape, logical):
  """PartitionSpec of `logical` axes under the active rules, dropping mesh axes that do
  not divide the dimension."""
  spec = nn.logical_to_mesh_axes(logical)
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    names = tuple(a for a in names if a in mesh.axis_names)
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    out.append((names if len(names) > 1 else names[0]) if names and dim % size == 0 else None)
  return jax.sharding.PartitionSpec(*out)


def _attend_pallas(q, k, v, bias):
  """Pallas TPU flash attention (jax.experimental.pallas.ops.tpu.flash_attention). Its `ab`
  bias is added before the softmax scale, so it gets bias / scale; padding becomes segment
  ids; T is padded to a multiple of the 128-tile with hidden keys (T <= 128 costs a whole tile). Under a mesh the
  kernel runs per shard (shard_map over the batch and head axes): a Pallas call is not
  partitioned by XLA."""
  # the Pallas TPU kernel is imported only where it is used
  from jax.experimental.pallas.ops.tpu import flash_attention as fa
  b, t, h, d = q.shape
  scale = float(1.0 / np.sqrt(d))
  kind = bias_kind(None if bias is None else bias.shape)
  valid = ab = None
  if kind == "padding":
    valid = _key_valid(bias, b, t)
  elif bias is not None:
    ab = jnp.broadcast_to(bias.astype(jnp.float32) / scale, (b, h, t, t))
  tp = -(-t // PALLAS_BLOCK) * PALLAS_BLOCK   # Mosaic: "kv block size must be a multiple of 128"
  if tp != t:
    valid = jnp.pad(jnp.ones((b, t), bool) if valid is None else valid, ((0, 0), (0, tp - t)))
    q, k, v = (jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0))) for x in (q, k, v))
    if ab is not None:
      ab = jnp.pad(ab, ((0, 0), (0, 0), (0, tp - t), (0, tp - t)))
  blk = _pallas_block(tp)
  sizes = fa.BlockSizes(block_q=blk, block_k_major=blk, block_k=blk, block_b=1,
                        block_q_major_dkv=blk, block_k_major_dkv=blk, block_k_dkv=blk,
                        block_q_dkv=blk, block_k_major_dq=blk, block_k_dq=blk, block_q_dq=blk)
  args = {"q": q, "k": k, "v": v}
  if ab is not None:
    args["ab"] = ab
  if valid is not None:
    args["valid"] = valid.astype(jnp.int32)

  def kernel(a):
    seg = None
    if "valid" in a:
      seg = fa.SegmentIds(q=jnp.ones_like(a["valid"]), kv=a["valid"])
    bhtd = lambda x: x.transpose(0, 2, 1, 3)
    o = fa.flash_attention(bhtd(a["q"]), bhtd(a["k"]), bhtd(a["v"]), a.get("ab"), seg,
                           sm_scale=scale, block_sizes=sizes)
    return bhtd(o)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    out = kernel(args)
  else:
    logical = {"q": ("act_batch", None, "act_heads", None), "ab": ("act_batch", "act_heads", None, None),
               "valid": ("act_batch", None)}
    specs = {n: _mesh_spec(mesh, x.shape, logical.get(n, logical["q"])) for n, x in args.items()}
    out = jax.shard_map(kernel, mesh=mesh, in_specs=(specs,), out_specs=specs["q"],
                        check_vma=False)(args)
  return out[:, :t]


def attend(q, k, v, bias, *, impl: str, dropout=None, key_padding: str = "any",
           dpa_implementation: str = "cudnn"):
  """softmax(q k^T / sqrt(D) + bias) v for q, k, v [B, T, H, D] (compute dtype) and an
  additive float32 bias broadcastable to [B, H, T, T] (see `bias_kind`) -> [B, T, H, D].
  `dropout` (probs -> probs) is applied by the XLA path only. `dpa_implementation` is what
  the cudnn path passes to jax.nn.dot_product_attention ("xla" in CPU tests)."""
  if impl == "xla":
    return _attend_xla(q, k, v, bias, dropout)
  if dropout is not None:
    raise ValueError(f"attention implementation {impl} has no dropout")
  if impl == "cudnn":
    return _attend_dpa(q, k, v, bias, key_padding, dpa_implementation)
  if impl == "pallas":
    return _attend_pallas(q, k, v, bias)
  raise ValueError(f"unknown attention implementation {impl!r}")
