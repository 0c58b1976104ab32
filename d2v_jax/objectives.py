"""Training objectives: what one step computes between the batch and the loss.

An objective is one function `forward(model, params, teacher, batch, rng, cfg) -> (loss, aux)`
chosen by `cfg.objective`; d2v_jax/step.py differentiates it and does the rest (optimizer,
EMA, metrics) the same way for both. `aux` is an `Aux`: what the metrics read.

v1 (data2vec 1.0, docs/algorithm.md §1): the teacher encodes the unmasked input, the student the
  masked input (mask token / masked ids / mask embedding), a regression head predicts the
  targets at the masked positions.
v2 (data2vec 2.0, §3): the local features are computed once per example; the teacher
  encodes them (text, audio: the student's features; vision: its own EMA patch embedding of
  the raw image) once per example; the student encodes only the visible tokens of each of M
  masked clones; a conv decoder predicts every position; L2 at the masked positions of all
  clones, normalised by their count; optional CLS loss (vision) on the mean target.

With `teacher.share_local` (audio; v2 text) the teacher reads the student's local features
(fairseq computes the conv front end once: the teacher runs no CNN) instead of recomputing them.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from d2v_jax import ema, targets as T
from d2v_jax.config import ConfigError
from d2v_jax.models.transformer import constrain


@flax.struct.dataclass
class Aux:
  """What an objective hands the step besides the loss (shapes: N student rows = B for v1,
  B x M clones for v2; B teacher rows; K target layers)."""
  pred: jax.Array              # [N, T, D] the student's predictions at every position
  target: jax.Array            # [N, T, D] the targets, row-aligned with pred
  mask: jax.Array              # [N, T] bool: the positions the loss covers
  n_masked: jax.Array          # scalar: mask.sum()
  top: jax.Array               # [K, B, T, D] the teacher's raw top-K layer outputs
  valid: jax.Array | None      # [B, T] bool: real (not padded) positions, None = all
  top_mask: jax.Array          # [B, T] bool: the loss positions of the B teacher rows
  features: tuple | None       # (x [B, T, C], valid) the shared local features, or None


def _teacher(model, params, teacher, batch, cfg, local=None):
  """Top-K targets of the teacher (no dropout, no gradient) -> (y [B, T, D], valid, top)."""
  n_extra = model.embed.num_extra_tokens
  tparams = {"params": ema.teacher_params(params, teacher)}
  with jax.named_scope("teacher"):
    if local is not None:
      x, valid = jax.lax.stop_gradient(local[0]), local[1]
      out = model.apply(tparams, x, valid, method=model.teacher_from)
    else:
      out = model.apply(tparams, batch, student=False, deterministic=True)
    valid = out["valid"]
    valid = None if valid is None else valid[:, n_extra:]
    layers = jax.lax.stop_gradient(out["layers"][:, :, n_extra:])
    y = T.targets_from_config(layers, valid, cfg.target)
  return jax.lax.stop_gradient(y), valid, layers[-cfg.target.top_k:]


def share_local(cfg) -> bool:
  return bool(cfg.teacher.share_local)


def teacher_targets(model, params, teacher, batch, cfg):
  """(y, valid) exactly as the step's teacher computes them (probes, tests)."""
  local = None
  if share_local(cfg):
    local = model.apply({"params": params}, batch, deterministic=True, method=model.local)
  y, valid, _ = _teacher(model, params, teacher, batch, cfg, local)
  return y, valid


def v1(model, params, teacher, batch, rng, cfg):
  n_extra = model.embed.num_extra_tokens
  mask = batch["mask"]
  rngs = {"dropout": rng}
  if share_local(cfg):
    x, valid = model.apply({"params": params}, batch, method=model.local)
    y, tvalid, top = _teacher(model, params, teacher, batch, cfg, (x, valid))
    out = model.apply({"params": params}, x, valid, mask, deterministic=False, rngs=rngs,
                      method=model.student_from)
    features = (x, valid)
  else:
    y, tvalid, top = _teacher(model, params, teacher, batch, cfg)
    out = model.apply({"params": params}, batch, student=True, deterministic=False, rngs=rngs)
    features = None
  pred = out["pred"][:, n_extra:]
  loss, n = T.regression_loss(pred, y, mask, beta=cfg.loss.beta, scale=cfg.loss.scale,
                              reduce_dims=cfg.loss.reduce_dims)
  return loss, Aux(pred=pred, target=y, mask=mask, n_masked=n, top=top, valid=tvalid,
                   top_mask=mask, features=features)


def _repeat(x, m: int):
  """[B, ...] -> [B * M, ...], clone-major within each example (torch repeat_interleave)."""
  if x is None:
    return None
  return constrain(jnp.repeat(x, m, axis=0), "act_batch", *([None] * (x.ndim - 1)))


def v2(model, params, teacher, batch, rng, cfg):
  n_extra = model.embed.num_extra_tokens
  mask3, visible3 = batch["mask"], batch["visible"]
  b, m, t = mask3.shape
  mask = mask3.reshape(b * m, t)
  visible = visible3.reshape(b * m, visible3.shape[-1])
  k_local, k_student, k_noise = jax.random.split(rng, 3)
  x, valid = model.apply({"params": params}, batch, deterministic=False,
                         rngs={"dropout": k_local}, method=model.local)
  y, tvalid, top = _teacher(model, params, teacher, batch, cfg,
                            (x, valid) if share_local(cfg) else None)
  out = model.apply({"params": params}, _repeat(x, m), _repeat(valid, m), mask, visible,
                    deterministic=False, noise_rng=k_noise, rngs={"dropout": k_student},
                    method=model.student_v2)
  pred = out["pred"]
  y_rep = _repeat(y, m)
  loss_mask = mask if valid is None else mask & _repeat(valid, m)
  loss, n = T.regression_loss(pred, y_rep, loss_mask, beta=cfg.loss.beta, scale=cfg.loss.scale,
                              reduce_dims=cfg.loss.reduce_dims)
  cls_w = float(cfg.v2.cls_loss)
  if cls_w > 0 and n_extra > 0:
    # fairseq: the student's raw CLS output regresses the mean over positions of the final
    # target; see configs/vision.py for how cls_loss relates to fairseq's weighting.
    cls_target = _repeat(T.masked_mean(y, tvalid), m)
    cls = T.per_row_loss(out["extra"][:, 0], cls_target, beta=cfg.loss.beta, scale=cfg.loss.scale,
                         reduce_dims=cfg.loss.reduce_dims)
    loss = loss + cls_w * cls.mean()
  return loss, Aux(pred=pred, target=y_rep, mask=loss_mask, n_masked=n, top=top, valid=tvalid,
                   top_mask=mask3[:, 0] if tvalid is None else mask3[:, 0] & tvalid,
                   features=(x, valid) if share_local(cfg) else None)


OBJECTIVES = {"v1": v1, "v2": v2}


def get(cfg):
  name = cfg.objective
  if name not in OBJECTIVES:
    raise ConfigError(f"objective={name!r} must be one of {sorted(OBJECTIVES)}")
  return OBJECTIVES[name]
