"""EMA teacher: decay schedule tau(step) and the elementwise update (docs/algorithm.md §1.1).

tau(n) = tau_end - (tau_end - tau_start) * (1 - n / anneal_steps) for n < anneal_steps,
tau_end afterwards (fairseq `get_annealed_rate`); anneal_steps <= 0 or tau_start == tau_end
gives a constant tau (data2vec_vision). n is the number of updates INCLUDING the one just
applied (fairseq calls set_num_updates(n) after the optimizer step, then steps the EMA). The
update runs in float32 on each shard of the
teacher tree (same sharding as the student subtree it mirrors: no gathers).
"""

from __future__ import annotations

import fnmatch

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
  """teacher <- tau * teacher + (1 - tau) * student, leaf by leaf, in float32. At tau >= 1 the
  teacher is kept as it is (fairseq skips the update; data2vec 2.0 configs ending at 1.0)."""
  tau = jnp.asarray(tau, jnp.float32)
  return jax.tree_util.tree_map(
      lambda t, s: jnp.where(tau >= 1.0, t,
                             (t * tau + s.astype(jnp.float32) * (1.0 - tau)).astype(t.dtype)),
      teacher, student)


def _select(params: dict, parts: list[str], path: str):
  head, rest = parts[0], parts[1:]
  names = [k for k in params if fnmatch.fnmatchcase(k, head)]
  if not names:
    raise ValueError(f"teacher.ema_subtrees names {path!r}, not in the model's params "
                     f"(at {head!r}: {sorted(params)})")
  if not rest:
    return {k: params[k] for k in names}
  return {k: _select(params[k], rest, path) for k in names}


def _merge(a: dict, b: dict) -> dict:
  out = dict(a)
  for k, v in b.items():
    out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out


def teacher_view(params: dict, subtrees) -> dict:
  """The student subtrees the teacher keeps an EMA copy of. A subtree is a top-level name
  ("encoder") or a path with wildcards ("embed/pos_conv_*": data2vec 2.0 audio EMAs the
  positional conv but shares the conv feature extractor)."""
  out: dict = {}
  for path in subtrees:
    out = _merge(out, _select(params, path.split("/"), path))
  return out


def select_like(params: dict, like: dict) -> dict:
  """The part of `params` with the nested structure of `like` (a teacher tree)."""
  return {k: select_like(params[k], v) if isinstance(v, dict) else params[k] for k, v in like.items()}


def teacher_params(params: dict, teacher: dict) -> dict:
  """Full parameter tree for the teacher forward: EMA subtrees from `teacher`, the rest shared
  (read live from the student, without gradient)."""
  return _merge(jax.tree_util.tree_map(jax.lax.stop_gradient, params), teacher)
