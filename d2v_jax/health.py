"""Health of a data2vec step: per-step collapse signals computed inside the jitted step (the
in-training rank / probe hook is d2v_jax/eval_hook.py).

Per step (inside the jitted train step, d2v_jax/step.py), on the positions the loss covers:
  target_var_l{i}    per-dim std over masked positions, averaged over dims (fairseq
                     `compute_var`, the same statistic as `target_var`), of each of the K
                     normalised teacher layers i that the targets average (1-based layer
                     numbers). A layer whose value falls towards 0 is collapsing.
  pred_target_cos    mean cosine similarity of the student prediction and its target.
  teacher_dist       relative L2 distance ||teacher - student|| / ||student|| over the EMA
                     subtrees (0 when the teacher copies the student; grows with 1 - tau).
  rank_target        effective rank (RankMe) of the targets at the masked positions, from the
  rank_pred          D x D correlation matrix of those rows (per-channel standardised, so a
                     per-channel scale, e.g. instance norm, cannot hide collapse or fake rank):
                     1 = every target on one line, D = uncorrelated channels. Every
                     eval.step_rank_every steps (default 10, NaN on the steps between;
                     1 = every step; 0 = off).
                     Guarded by guards.min_target_rank (d2v_jax/metrics.py Guards).
  feature_var        (when step.py passes `features`) mean over channels of the per-channel
                     variance of the local encoder's output (audio conv features) over valid
                     frames.
The evaluation every eval.rank_every / eval.probe_every steps (rank and probes of token
features) is the trainer's: d2v_jax/eval_hook.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from d2v_jax import targets as T
from d2v_jax.probe.rank import RANK_EPS
CORR_FLOOR = 1e-8  # in-step rank: channel variances below this x their mean count as dead


# ------------------------------------------------------------------------ per-step metrics


def layer_target_std(top: jax.Array, valid: jax.Array | None, mask: jax.Array,
                     layer_norm_kind: str) -> jax.Array:
  """[K] masked_std_mean of each of the K top teacher layers after its per-layer norm.

  top: [K, B, T, D] raw teacher outputs of the layers the targets average; valid: [B, T] or
  None; mask: [B, T] positions the loss covers.
  """
  one = lambda layer: T.make_targets(layer[None], valid, top_k=1, layer_norm_kind=layer_norm_kind,
                                     final_norm_kind="none")
  return jax.vmap(lambda layer: T.masked_std_mean(one(layer), mask))(top)


def masked_cosine(pred: jax.Array, target: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Mean over masked positions of cos(pred, target) along the channel axis."""
  p, t = pred.astype(jnp.float32), target.astype(jnp.float32)
  cos = (p * t).sum(-1) * jax.lax.rsqrt(
      jnp.maximum(jnp.square(p).sum(-1) * jnp.square(t).sum(-1), eps * eps))
  m = mask.astype(jnp.float32)
  return (cos * m).sum() / jnp.maximum(m.sum(), 1.0)


def relative_distance(teacher, student) -> jax.Array:
  """||teacher - student||_2 / ||student||_2 over all leaves (float32)."""
  f32 = lambda x: x.astype(jnp.float32)
  sq = lambda tree: sum(jnp.sum(jnp.square(f32(x))) for x in jax.tree_util.tree_leaves(tree))
  diff = jax.tree_util.tree_map(lambda a, b: f32(a) - f32(b), teacher, student)
  return jnp.sqrt(sq(diff)) / jnp.maximum(jnp.sqrt(sq(student)), 1e-12)


def layer_names(num_layers: int, top_k: int) -> list[str]:
  """Metric names of the K target layers (1-based layer numbers of the stack)."""
  return [f"target_var_l{i}" for i in range(num_layers - top_k + 1, num_layers + 1)]


def masked_correlation(x: jax.Array, w: jax.Array) -> jax.Array:
  """[D, D] float32 correlation matrix of the rows of x [..., D] weighted by w [...] (0 / 1).

  Covariance of the weighted rows (centred on their weighted mean), then divided by
  sqrt(var_i var_j): every channel standardised, so it is invariant to per-channel scaling.
  A channel whose variance is below CORR_FLOOR x the mean variance (dead, constant) is divided
  by that floor instead and contributes ~0 to every eigenvalue.
  """
  x = x.astype(jnp.float32).reshape(-1, x.shape[-1])
  w = w.astype(jnp.float32).reshape(-1, 1)
  n = jnp.maximum(w.sum(), 1.0)
  xc = (x - (x * w).sum(0) / n) * w
  cov = jnp.einsum("nd,ne->de", xc, xc, precision=jax.lax.Precision.HIGHEST) / n
  var = jnp.diagonal(cov)
  inv = jax.lax.rsqrt(jnp.maximum(var, CORR_FLOOR * jnp.maximum(var.mean(), 1e-30)))
  return cov * inv[:, None] * inv[None, :]


def effective_rank_of_psd(mat: jax.Array) -> jax.Array:
  """RankMe (jnp, in the step) of a feature matrix X from its Gram / covariance M = X^T X / n:
  singular values of X ~ sqrt(eigenvalues of M clipped at 0); the 1/n scale cancels.
  Eigenvalues below D x float32 eps x the largest (rounding noise, numpy's matrix_rank
  tolerance) count as 0: their square roots would otherwise add ~1e-3 to a rank of 1."""
  lam = jnp.linalg.eigvalsh((mat + mat.T) / 2)
  tol = mat.shape[-1] * float(np.finfo(np.float32).eps) * jnp.max(lam)
  s = jnp.sqrt(jnp.where(lam > tol, lam, 0.0))
  p = s / jnp.maximum(s.sum(), 1e-30) + RANK_EPS
  return jnp.exp(-(p * jnp.log(p)).sum())


def masked_effective_rank(x: jax.Array, w: jax.Array) -> jax.Array:
  """RankMe of the per-channel standardised rows of x [..., D] where w [...] is set: between 1
  (every row on one line) and D (uncorrelated channels)."""
  return effective_rank_of_psd(masked_correlation(x, w))


def masked_channel_var(x: jax.Array, w: jax.Array | None) -> jax.Array:
  """Mean over channels of the per-channel (population) variance of the rows of x [B, T, C]
  where w [B, T] is set (all rows when w is None)."""
  x = x.astype(jnp.float32).reshape(-1, x.shape[-1])
  w = jnp.ones(x.shape[:1], jnp.float32) if w is None else w.astype(jnp.float32).reshape(-1)
  w = w[:, None]
  n = jnp.maximum(w.sum(), 1.0)
  mean = (x * w).sum(0) / n
  return ((jnp.square(x - mean) * w).sum(0) / n).mean()


def rank_metrics(pred, target, mask, *, every: int = 1, step=None) -> dict:
  """rank_target / rank_pred: RankMe of the per-channel standardised targets / predictions
  at the masked positions. With every > 1 they are computed when step % every == 0 (a
  lax.cond) and NaN on the other steps (the log window and the guards skip NaN ranks)."""
  both = lambda: (masked_effective_rank(target, mask), masked_effective_rank(pred, mask))
  if every > 1 and step is not None:
    nan = lambda: (jnp.float32(jnp.nan), jnp.float32(jnp.nan))
    rt, rp = jax.lax.cond(step % every == 0, both, nan)
  else:
    rt, rp = both()
  return {"rank_target": rt, "rank_pred": rp}


def step_metrics(aux, *, teacher, student_view, cfg, step=None) -> dict:
  """The health metrics train_step adds to its metrics dict (all scalars), from the
  objective's outputs `aux` (objectives.Aux): per-layer target stds on the B teacher rows'
  loss positions (`top_mask`: in data2vec 2.0 one clone's mask, since pred / target / mask
  have B x M rows), prediction / target cosine, teacher distance, in-step ranks (`step`: the
  state's step before the update, for eval.step_rank_every > 1) and, when the objective
  shares local features (audio: the conv frames), their variance over time.
  """
  stds = layer_target_std(aux.top, aux.valid, aux.top_mask, cfg.target.layer_norm)
  names = layer_names(cfg.model.encoder.num_layers, aux.top.shape[0])
  out = {name: stds[i] for i, name in enumerate(names)}
  out["pred_target_cos"] = masked_cosine(aux.pred, aux.target, aux.mask)
  out["teacher_dist"] = relative_distance(teacher, student_view)
  every = int(cfg.eval.step_rank_every)
  if every:
    out.update(rank_metrics(aux.pred, aux.target, aux.mask, every=every, step=step))
  if aux.features is not None:
    x, fv = aux.features
    out["feature_var"] = masked_channel_var(x, fv)
  return out
