"""The train step: teacher targets, student loss, optax update, EMA update, metrics.

`train_step(state, batch) -> (state, metrics)` is a pure function; model, optimizer and
config are bound with functools.partial. `jit_step` returns it compiled with explicit
shardings and the state donated; the trainer and the AOT compiler both use it, so they
compile exactly the same program.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from d2v_jax import ema, health, objectives, targets as T
from d2v_jax.state import TrainState


def _global_norm(tree) -> jax.Array:
  return optax.global_norm(jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), tree))


def teacher_targets(model, params, teacher, batch, cfg):
  """Targets [B, T', D] and their valid mask from the teacher, as the step computes them."""
  return objectives.teacher_targets(model, params, teacher, batch, cfg)


def train_step(state: TrainState, batch: dict, *, model, tx, lr_fn, cfg):
  forward = objectives.get(cfg)
  step_rng = jax.random.fold_in(state.rng, state.step)
  # The named scopes label the step's phases in profiles (python -m d2v_jax.bench profile);
  # the objective opens "teacher" itself.
  loss_fn = lambda params: forward(model, params, state.teacher, batch, step_rng, cfg)
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  with jax.named_scope("optimizer"):
    grad_norm = _global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
  with jax.named_scope("ema"):
    # fairseq steps the EMA with the update count after this update (ema.py).
    tau = ema.tau_from_config(state.step + 1, cfg.teacher)
    teacher = ema.ema_update(state.teacher, ema.select_like(params, state.teacher), tau)

  # A non-finite loss, gradient or updated parameter (a finite gradient times a huge lr, an
  # overflowing Adam moment) skips the update: params, teacher and optimizer state stay.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(_global_norm(params))
  keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = state.replace(
      step=state.step + 1, params=keep(params, state.params), teacher=keep(teacher, state.teacher),
      opt_state=keep(opt_state, state.opt_state))
  with jax.named_scope("metrics"):
    metrics = {
        "loss": loss,
        "lr": lr_fn(state.step),
        "tau": tau,
        "grad_norm": grad_norm,
        "param_norm": _global_norm(new_state.params),
        "target_var": T.masked_std_mean(aux.target, aux.mask),
        "pred_var": T.masked_std_mean(aux.pred, aux.mask),
        "masked_frac": aux.n_masked / aux.mask.size,
        "nonfinite": 1 - finite.astype(jnp.int32),
        **health.step_metrics(aux, teacher=new_state.teacher,
                              student_view=ema.select_like(new_state.params, new_state.teacher),
                              cfg=cfg, step=state.step),
    }
  return new_state, metrics


def bind(model, tx, lr_fn, cfg):
  return functools.partial(train_step, model=model, tx=tx, lr_fn=lr_fn, cfg=cfg)


class MeshStep:
  """The jitted step bound to its mesh: call it like the step; `lower(state, batch)` gives
  the lowered program (the AOT compiler and the benchmarks compile exactly what runs)."""

  def __init__(self, jitted, mesh):
    self.jitted, self.mesh = jitted, mesh

  def __call__(self, state, batch):
    with jax.set_mesh(self.mesh):
      return self.jitted(state, batch)

  def lower(self, state, batch):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(state, batch)


def jit_step(step_fn, mesh, state_shardings, batch_shardings, rules) -> MeshStep:
  """The compiled step with explicit in/out shardings; state (argument 0) is donated."""
  metric_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def with_rules(state, batch):
    with nn.logical_axis_rules(rules):
      return step_fn(state, batch)

  return MeshStep(jax.jit(with_rules, in_shardings=(state_shardings, batch_shardings),
                          out_shardings=(state_shardings, metric_sh), donate_argnums=(0,)), mesh)
