"""The train step: teacher input, NaN skip, sharded == single device."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from d2v_jax import build as build_lib, step as step_lib
from d2v_jax.data import text as text_data
from step_utils import assert_same_training, run_steps, step_once_keeps_shardings, tiny_text_config


def _targets(built, state, batch):
  b = jax.tree_util.tree_map(jnp.asarray, batch)
  y, _ = step_lib.teacher_targets(built.model, state.params, state.teacher, b, built.cfg)
  return np.asarray(y)


def test_teacher_sees_the_unmasked_input():
  cfg = tiny_text_config()
  built = build_lib.build(cfg, devices=jax.devices()[:1])
  state = jax.device_get(built.init(0))
  batch = text_data.example_batch(cfg, 2)
  pos = int(np.argmax(batch["mask"][0]))  # a masked position of row 0
  base = _targets(built, state, batch)

  changed_student = {k: v.copy() for k, v in batch.items()}
  changed_student["student"][0, pos] = 7   # what the student sees at a masked slot
  np.testing.assert_array_equal(_targets(built, state, changed_student), base)

  changed_source = {k: v.copy() for k, v in batch.items()}
  changed_source["source"][0, pos] = (batch["source"][0, pos] + 1) % 90 + 4
  diff = np.abs(_targets(built, state, changed_source) - base)
  assert diff[0].max() > 1e-3        # the original token changes the teacher's targets
  np.testing.assert_array_equal(diff[1], 0)  # other rows untouched


def test_loss_decreases_and_teacher_moves_by_tau():
  cfg = tiny_text_config()
  state0, _, _ = run_steps(cfg, 0, devices=jax.devices()[:1])
  state, ms, _ = run_steps(cfg, 6, devices=jax.devices()[:1])
  assert ms[-1]["loss"] < ms[0]["loss"]
  assert all(m["nonfinite"] == 0 for m in ms)
  # Shared subtrees are not in the teacher; its EMA subtree moved towards the student.
  assert set(state.teacher) == {"encoder"}
  t0 = jax.tree_util.tree_leaves(state0.teacher)[0]
  t, s = jax.tree_util.tree_leaves(state.teacher)[0], jax.tree_util.tree_leaves(state.params["encoder"])[0]
  assert 0 < np.abs(t - t0).max() < np.abs(s - t0).max()


def test_nonfinite_step_is_skipped():
  cfg = tiny_text_config()
  built = build_lib.build(cfg, devices=jax.devices()[:1])
  state = built.init(0)
  before = jax.device_get(state)
  batch = text_data.example_batch(cfg, cfg.batch_size)
  bad = {**batch, "mask": np.zeros_like(batch["mask"])}
  # Poison the parameters' input path: an all-NaN embedding row used by the batch.
  state = state.replace(params={**state.params, "embed": jax.tree_util.tree_map(
      lambda x: x * jnp.nan if x.ndim == 2 and x.shape[0] == cfg.model.vocab_size else x,
      state.params["embed"])})
  poisoned = jax.device_get(state)
  new, m = built.step(state, build_lib.to_global(bad, built.batch_shardings))
  m, new = jax.device_get(m), jax.device_get(new)
  assert int(m["nonfinite"]) == 1
  assert int(new.step) == 1
  for a, b in zip(jax.tree_util.tree_leaves(new.teacher), jax.tree_util.tree_leaves(before.teacher)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree_util.tree_leaves(new.opt_state), jax.tree_util.tree_leaves(poisoned.opt_state)):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def single_device_run():
  """The 1-device reference of the sharded comparisons (the same for every mesh)."""
  return run_steps(tiny_text_config(), 3, devices=jax.devices()[:1])


@pytest.mark.parametrize("mesh", [dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=2, tensor=2),
                                  dict(data=1, fsdp=4, tensor=2)])
def test_sharded_step_equals_single_device(mesh, single_device_run):
  """8 fake devices vs 1: losses within 1e-5 relative, params within 1e-5 abs after 3 steps."""
  cfg = tiny_text_config(**{f"mesh.{k}": v for k, v in mesh.items()})
  sharded = run_steps(cfg, 3, devices=jax.devices()[:8])
  assert_same_training(single_device_run, sharded, 1e-5)
  step_once_keeps_shardings(cfg, sharded[2])   # declared shardings kept on every output leaf


def test_bfloat16_compute_keeps_float32_master_teacher_and_optimizer():
  cfg = tiny_text_config(dtype="bfloat16")
  state, ms, built = run_steps(cfg, 2, devices=jax.devices()[:1])
  assert np.isfinite(ms[-1]["loss"])
  for tree in (state.params, state.teacher, state.opt_state):
    for leaf in jax.tree_util.tree_leaves(tree):
      if np.issubdtype(np.asarray(leaf).dtype, np.floating):
        assert np.asarray(leaf).dtype == np.float32
  # The forward really runs in bfloat16.
  out = built.model.apply({"params": state.params},
                          jax.tree_util.tree_map(jnp.asarray, text_data.example_batch(cfg, 2)),
                          student=True)
  assert out["final"].dtype == jnp.bfloat16
