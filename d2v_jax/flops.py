"""Model FLOPs of a train step: one analytic model for every modality and objective, and the
matmul count of a traced program.

Analytic (`model_flops`): teacher forward + student forward (with head, or data2vec 2.0's
decoder on every clone) + student backward = 2x its forward, matmuls and convolutions only, a
multiply-add = 2 FLOPs. The Transformer stack, head and decoder come from the config; the
embedder (patch / conv front end, positional conv) is counted on its traced forward, so a new
modality needs no FLOP code. The AOT compile report (d2v_jax/compile.py) and the MFU benchmark
(d2v_jax/bench/mfu.py) both use it.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
from jax.extend import core as jcore

from d2v_jax import sharding


def _subjaxprs(params) -> list:
  """Jaxprs held in an equation's params (pjit, scan, cond branches, remat, custom_vjp...)."""
  out = []
  for v in params.values():
    for x in (v if isinstance(v, (tuple, list)) else (v,)):
      if isinstance(x, jcore.ClosedJaxpr):
        out.append(x.jaxpr)
      elif isinstance(x, jcore.Jaxpr):
        out.append(x)
  return out


def _dot_flops(eqn) -> float:
  lhs = eqn.invars[0].aval.shape
  (lc, _), _ = eqn.params["dimension_numbers"]
  out = eqn.outvars[0].aval.shape
  return 2.0 * math.prod(out) * math.prod(lhs[d] for d in lc)


def _conv_flops(eqn) -> float:
  rhs = eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  dn = eqn.params["dimension_numbers"]
  out_feat = rhs[dn.rhs_spec[0]]
  return 2.0 * math.prod(out) * math.prod(rhs) / out_feat / eqn.params.get("batch_group_count", 1)


def matmul_flops(jaxpr, scale_loops: bool = True) -> float:
  """Dot and convolution FLOPs of a jaxpr (global shapes). scan bodies count `length` times
  (with scale_loops=False: as many times as XLA's loop body holds them, which is what its
  cost analysis counts); cond takes its costliest branch; while loops count once (their trip
  count is not static). The step's "metrics" scope (health statistics such as the in-step
  effective rank's covariance) is not model compute and is left out."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if "metrics" in str(eqn.source_info.name_stack).split("/"):
      continue
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    subs = [matmul_flops(j, scale_loops) for j in _subjaxprs(eqn.params)]
    if not subs:
      continue
    if name == "cond":
      total += max(subs)
    elif name == "scan":
      # XLA's loop body holds `unroll` copies of the scan body and runs length/unroll times.
      length, unroll = eqn.params["length"], eqn.params.get("unroll", 1)
      copies = length if unroll is True or int(unroll) >= length else max(int(unroll), 1)
      total += (length if scale_loops else copies) * sum(subs)
    else:
      total += sum(subs)
  return total


def head_flops_per_token(d: int, layers: int, mult: int) -> float:
  """Regression head (d2v_jax/models/data2vec.RegressionHead) matmul FLOPs per position."""
  if layers <= 1:
    return 2.0 * d * d
  h = d * mult
  return 2.0 * d * h + (layers - 2) * 2.0 * h * h + 2.0 * h * d


def encoder_flops_per_token(enc, seq_len: int) -> float:
  """One Transformer block's forward matmul FLOPs per position: q, k, v, out projections,
  the two FFN matmuls, and the attention scores and weighted sum over seq_len keys."""
  d, m = enc.hidden, enc.mlp_dim
  return 8.0 * d * d + 4.0 * d * m + 4.0 * seq_len * d


def analytic_flops(cfg, batch: int, seq_len: int, embed_teacher: float = 0.0,
                   embed_student: float = 0.0) -> dict:
  """Model FLOPs of one step (global): teacher forward + student forward (with head) +
  student backward (2x its forward). seq_len counts every encoder position (CLS included)."""
  enc = cfg.model.encoder
  tokens = batch * seq_len
  layer = encoder_flops_per_token(enc, seq_len)
  teacher = tokens * enc.num_layers * layer + embed_teacher
  student = tokens * (enc.num_layers * layer + head_flops_per_token(
      enc.hidden, cfg.head.layers, cfg.head.hidden_mult)) + embed_student
  return {"teacher_fwd": teacher, "student_fwd": student, "student_bwd": 2 * student,
          "total": teacher + 3 * student}


def decoder_flops_per_position(cfg) -> float:
  """data2vec 2.0 conv decoder (d2v_jax/models/decoder.py) forward FLOPs per position."""
  d = cfg.v2.decoder
  window = d.kernel ** (2 if d.kind == "2d" else 1)
  cin, total = cfg.model.encoder.hidden, 0.0
  for _ in range(d.layers):
    total += 2.0 * window * (cin // d.groups) * d.dim
    cin = d.dim
  cur = d.dim
  for i in range(d.proj_layers - 1):
    nxt = int(cur * d.proj_ratio) if i == 0 else cur
    total += 2.0 * cur * nxt
    cur = nxt
  return total + 2.0 * cur * cfg.model.encoder.hidden


def analytic_flops_v2(cfg, batch: int, seq_len: int, visible: int, positions: int,
                      embed_teacher: float = 0.0, embed_student: float = 0.0) -> dict:
  """data2vec 2.0: the teacher on B full sequences (seq_len incl. extra tokens), the student
  on B x M clones of `visible` + extra tokens, the decoder on all `positions` of every clone;
  backward = 2x the student's forward (embed_student: the local features, computed once)."""
  enc = cfg.model.encoder
  m = int(cfg.v2.clone_batch)
  extra = seq_len - positions
  teacher = batch * seq_len * enc.num_layers * encoder_flops_per_token(enc, seq_len) + embed_teacher
  k = visible + extra
  student = (batch * m * k * enc.num_layers * encoder_flops_per_token(enc, k)
             + batch * m * positions * decoder_flops_per_position(cfg) + embed_student)
  return {"teacher_fwd": teacher, "student_fwd": student, "student_bwd": 2 * student,
          "total": teacher + 3 * student}


def model_flops(built, batch) -> tuple[dict, int]:
  """(analytic FLOPs of one global step by part, encoder sequence length) of `built` (build.Built)
  on `batch` (arrays or ShapeDtypeStructs of one global batch)."""
  cfg = built.cfg
  params = built.abstract_state.params
  local = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)

  def embed_only(p, b, student):
    return built.model.apply({"params": p}, b, student=student, deterministic=True,
                             method=lambda m, b, student, deterministic: m.embed(
                                 b, student=student, deterministic=deterministic))

  v2 = cfg.objective == "v2"   # v2 batches carry [B, M, T] masks: no masked view
  with nn.logical_axis_rules(sharding.RULES), jax.set_mesh(built.mesh):
    emb_s = jax.make_jaxpr(lambda p, b: embed_only(p, b, not v2))(params, local)
    emb_t = jax.make_jaxpr(lambda p, b: embed_only(p, b, False))(params, local)
    x_shape = jax.eval_shape(lambda p, b: embed_only(p, b, not v2), params, local)[0].shape
  seq_len = x_shape[1]
  b = local[next(iter(local))].shape[0]
  if v2:
    teacher_embed = 0.0 if cfg.teacher.share_local else matmul_flops(emb_t.jaxpr)
    model = analytic_flops_v2(cfg, b, seq_len, local["visible"].shape[-1], local["mask"].shape[-1],
                              teacher_embed, matmul_flops(emb_s.jaxpr))
  else:
    model = analytic_flops(cfg, b, seq_len, matmul_flops(emb_t.jaxpr), matmul_flops(emb_s.jaxpr))
  return model, seq_len
