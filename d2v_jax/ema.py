"""EMA teacher: decay schedule tau(step) and the elementwise update (ALGORITHM.md §1.1).

tau(n) = tau_end - (tau_end - tau_start) * (1 - n / anneal_steps) for n < anneal_steps,
tau_end afterwards (fairseq `get_annealed_rate`); anneal_steps <= 0 or tau_start == tau_end
gives a constant tau (data2vec_vision). The update runs in float32 on each shard of the
teacher tree (same sharding as the student subtree it mirrors: no gathers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def tau_at(step, *, tau_start: float, tau_end: float, anneal_steps: int) -> jax.Array:
  step = jnp.asarray(step, jnp.float32)
  if anneal_steps <= 0 or tau_start == tau_end:
    return jnp.full_like(step, tau_end)
  frac = jnp.clip(step / anneal_steps, 0.0, 1.0)
  return jnp.float32(tau_end) - (tau_end - tau_start) * (1.0 - frac)


def tau_from_config(step, teacher_cfg) -> jax.Array:
  return tau_at(step, tau_start=teacher_cfg.tau_start, tau_end=teacher_cfg.tau_end,
                anneal_steps=teacher_cfg.anneal_steps)


def ema_update(teacher, student, tau):
  """teacher <- tau * teacher + (1 - tau) * student, leaf by leaf, in float32."""
  tau = jnp.asarray(tau, jnp.float32)
  return jax.tree_util.tree_map(
      lambda t, s: (t * tau + s.astype(jnp.float32) * (1.0 - tau)).astype(t.dtype), teacher, student)


def teacher_view(params: dict, subtrees) -> dict:
  """The student subtrees the teacher keeps an EMA copy of."""
  missing = [k for k in subtrees if k not in params]
  if missing:
    raise ValueError(f"teacher.ema_subtrees names {missing}, not in the model's params {sorted(params)}")
  return {k: params[k] for k in subtrees}


def teacher_params(params: dict, teacher: dict) -> dict:
  """Full parameter tree for the teacher forward: EMA subtrees from `teacher`, the rest shared
  (read live from the student, without gradient)."""
  shared = {k: jax.lax.stop_gradient(v) for k, v in params.items() if k not in teacher}
  return {**shared, **teacher}
