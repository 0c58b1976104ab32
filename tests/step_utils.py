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


def assert_same_training(run_a, run_b, tol: float = 1e-5):
  """Two run_steps results: per-step losses (relative) and params / teacher / optimizer state
  (absolute and relative) within `tol`."""
  import numpy as np
  (sa, ma, _), (sb, mb, _) = run_a, run_b
  for a, b in zip(ma, mb):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=tol)
  for ta, tb in ((sa.params, sb.params), (sa.teacher, sb.teacher), (sa.opt_state, sb.opt_state)):
    for a, b in zip(jax.tree_util.tree_leaves(ta), jax.tree_util.tree_leaves(tb)):
      np.testing.assert_allclose(a, b, atol=tol, rtol=tol)


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
