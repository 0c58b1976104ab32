"""Tiny text setups for step / sharding tests (synthetic ids; no files)."""

import jax

from d2v_jax import build as build_lib, config as config_lib
from d2v_jax.data import text as text_data


def tiny_text_config(**overrides):
  cfg = config_lib.load_file("configs/text.py:variant=tiny")
  cfg.model.vocab_size = 96
  cfg.data.path = "synthetic"
  cfg.data.block_size = 16
  cfg.batch_size = 8
  cfg.total_steps = 10
  cfg.optim.warmup_steps = 2
  cfg.optim.lr = 1e-3
  for k, v in overrides.items():
    config_lib.set_path(cfg, k, v)
  return cfg


# Steps that change the model, for "trains like" comparisons: no warm-up (the first update is
# at the peak lr 1e-3; with the default warm-up the first step runs at lr 0, so two runs agree
# on step 1 and its loss whatever they do) and a teacher that moves (tau 0.9, not 0.999).
MOVING = {"optim.warmup_steps": 0, "teacher.tau_start": 0.9, "teacher.tau_end": 0.9}


def moving_text_config(**overrides):
  return tiny_text_config(**{**MOVING, **overrides})


def run_steps(cfg, n: int, devices=None, batch=None):
  """n steps from init(seed) on `devices`; returns (state on host, per-step metrics)."""
  built = build_lib.build(cfg, devices=devices)
  state = built.init(cfg.seed)
  batch = batch or text_data.example_batch(cfg, cfg.batch_size)
  out = []
  for _ in range(n):
    state, m = built.step(state, build_lib.to_global(batch, built.batch_shardings))
    jax.block_until_ready(state)  # one step in flight avoids XLA:CPU's collective rendezvous deadlock
    out.append({k: float(v) for k, v in jax.device_get(m).items()})
  return jax.device_get(state), out, built


def assert_trees_close(ta, tb, tol: float, what: str = "", per_leaf: bool = False):
  """Leaf by leaf within `tol`: absolute (parameters, teacher: their updates are ~lr per step,
  1e-3 here, whatever the leaf's scale), or with per_leaf=True relative to each leaf's largest
  |b| plus 1e-2 x the tree's largest (optimizer state: Adam's second moments are ~1e-8 and are
  compared as closely as the first; the floor covers leaves of pure rounding noise, such as
  the moments of key biases, which get no gradient). Integer leaves must be equal."""
  import numpy as np
  la, lb = jax.tree_util.tree_leaves(ta), jax.tree_util.tree_leaves(tb)
  assert len(la) == len(lb), what
  floats = [np.asarray(b) for b in lb if np.issubdtype(np.asarray(b).dtype, np.floating)]
  top = max((float(np.abs(b).max()) for b in floats if b.size), default=0.0)
  for i, (a, b) in enumerate(zip(la, lb)):
    a, b = np.asarray(a), np.asarray(b)
    if not np.issubdtype(b.dtype, np.floating):
      np.testing.assert_array_equal(a, b, err_msg=f"{what} leaf {i}")
      continue
    atol = tol * (float(np.abs(b).max()) + 1e-2 * top) if per_leaf else tol
    np.testing.assert_allclose(a, b, rtol=0, atol=atol, err_msg=f"{what} leaf {i}")


def assert_same_training(run_a, run_b, tol: float = 1e-5):
  """Two run_steps results: per-step losses (relative), params and teacher (absolute) and
  optimizer state (relative to each leaf, assert_trees_close) within `tol`. The runs must have
  trained:
  their losses change by more than 1000 x tol over the steps (a run at lr 0 fails here)."""
  import numpy as np
  (sa, ma, _), (sb, mb, _) = run_a, run_b
  assert len(ma) == len(mb)
  for a, b in zip(ma, mb):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=tol)
  losses = np.array([m["loss"] for m in mb])
  assert np.ptp(losses) > 1e3 * tol * np.abs(losses).max(), losses
  for name in ("params", "teacher", "opt_state"):
    assert_trees_close(getattr(sa, name), getattr(sb, name), tol, name, name == "opt_state")


def step_once_keeps_shardings(cfg, built):
  """One step from init on device; asserts every output leaf has its declared sharding and
  returns the new (device) state."""
  state = built.init(0)
  out, _ = built.step(state, build_lib.to_global(text_data.example_batch(cfg, cfg.batch_size),
                                                 built.batch_shardings))
  jax.block_until_ready(out)
  for leaf, want in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(built.state_shardings)):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
  return out
