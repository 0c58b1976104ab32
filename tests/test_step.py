"""The train step: teacher input, the EMA, the non-finite skip (what it keeps), per-step
dropout, sharded == single device."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from d2v_jax import build as build_lib, step as step_lib
from d2v_jax.data import text as text_data
from step_utils import (assert_same_training, moving_text_config, run_steps, step_once_keeps_shardings,
                        tiny_text_config)


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


def _host(tree):
  return jax.tree_util.tree_map(lambda x: np.asarray(x), jax.device_get(tree))


def test_teacher_is_the_ema_of_the_student():
  """6 steps from lr 1e-3 (no warm-up) with tau annealed 0.5 -> 0.9 over 4 updates: the
  teacher equals, leaf by leaf, the float64 replay teacher_n = tau(n) teacher_{n-1} +
  (1 - tau(n)) student_n (n counts the update just applied, as fairseq does) to 1e-6
  (float32 rounding: measured <= 2.2e-7), while tau one update off moves it by ~1e-4; the
  shared embedding is no part of the teacher."""
  cfg = moving_text_config(**{"teacher.tau_start": 0.5, "teacher.tau_end": 0.9,
                              "teacher.anneal_steps": 4})
  built = build_lib.build(cfg, devices=jax.devices()[:1])
  state = built.init(cfg.seed)
  batch = build_lib.to_global(text_data.example_batch(cfg, cfg.batch_size), built.batch_shardings)
  start = _host(state)
  assert set(start.teacher) == {"encoder"}
  want = jax.tree_util.tree_map(lambda x: x.astype(np.float64), start.teacher)
  losses, taus = [], []
  for n in range(1, 7):
    state, m = built.step(state, batch)
    m = jax.device_get(m)
    losses.append(float(m["loss"]))
    taus.append(float(m["tau"]))
    assert int(m["nonfinite"]) == 0
    tau = 0.9 - 0.4 * max(1 - n / 4, 0)
    student = _host(state.params)["encoder"]
    want = jax.tree_util.tree_map(lambda t, s: tau * t + (1 - tau) * s, want, {"encoder": student})
  np.testing.assert_allclose(taus, [0.6, 0.7, 0.8, 0.9, 0.9, 0.9], rtol=1e-6)
  assert len(set(losses)) == 6             # every step trained on new weights and targets
  got = _host(state.teacher)
  moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(got),
                                                          jax.tree_util.tree_leaves(start.teacher)))
  assert moved > 1e-3                      # the teacher moved 1000x the tolerance
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def _assert_kept(new, old, what):
  """Bitwise and NaN-aware (assert_array_equal treats NaN as equal to NaN)."""
  la, lb = jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(old)
  assert len(la) == len(lb) > 0, what
  for a, b in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=what)


def _assert_changed(new, old, what):
  assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
             zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(old))), what


def _skip_check(cfg, built, state, batch, control=None):
  """One step on (state, batch), which must be skipped: nonfinite = 1, the step counter
  advances (the data position and schedules go on), student params, teacher and optimizer
  state stay bit for bit. Positive control: the same step on a clean init and the clean batch
  changes all three (so the equality is no accident of a step that changes nothing); on
  `control` (a built step) where this config cannot take a clean step."""
  before = _host(state)
  new, m = built.step(state, build_lib.to_global(batch, built.batch_shardings))
  m, new = jax.device_get(m), _host(new)
  assert int(m["nonfinite"]) == 1
  assert int(new.step) == int(before.step) + 1
  _assert_kept(new.params, before.params, "params")
  _assert_kept(new.teacher, before.teacher, "teacher")
  _assert_kept(new.opt_state, before.opt_state, "opt_state")
  control = control or built
  clean = control.init(cfg.seed)
  clean0 = _host(clean)
  ok, mo = control.step(clean, build_lib.to_global(text_data.example_batch(cfg, cfg.batch_size),
                                                   control.batch_shardings))
  ok = _host(ok)
  assert int(jax.device_get(mo)["nonfinite"]) == 0
  for name in ("params", "teacher", "opt_state"):
    _assert_changed(getattr(ok, name), getattr(clean0, name), name)
  return m


def test_nonfinite_step_is_skipped():
  """A NaN loss (an all-NaN embedding row the batch reads): the update is skipped."""
  cfg = moving_text_config()
  built = build_lib.build(cfg, devices=jax.devices()[:1])
  state = built.init(0)
  batch = text_data.example_batch(cfg, cfg.batch_size)
  # Poison the parameters' input path: an all-NaN embedding row used by the batch.
  state = state.replace(params={**state.params, "embed": jax.tree_util.tree_map(
      lambda x: x * jnp.nan if x.ndim == 2 and x.shape[0] == cfg.model.vocab_size else x,
      state.params["embed"])})
  m = _skip_check(cfg, built, state, batch)
  assert np.isnan(float(m["loss"]))


def test_finite_loss_with_infinite_gradient_is_skipped():
  """The guard reads the gradient too: a loss scale of 1e25 keeps the loss finite (~1e26)
  and every gradient entry finite (<= ~1e26), while their squares overflow float32 in the
  global norm (inf). The parameters stay small (their own norm, which the guard also checks,
  is finite), so without the gradient check the step would go on: clip the gradient to zero,
  count an Adam step, decay the weights and move the teacher."""
  cfg = moving_text_config(**{"loss.scale": 1e25})
  built = build_lib.build(cfg, devices=jax.devices()[:1])
  control = build_lib.build(moving_text_config(), devices=jax.devices()[:1])
  m = _skip_check(cfg, built, built.init(0), text_data.example_batch(cfg, cfg.batch_size), control)
  assert np.isfinite(float(m["loss"])) and not np.isfinite(float(m["grad_norm"]))
  assert np.isfinite(float(m["param_norm"]))


def test_each_step_draws_its_own_dropout():
  """The step's random key is fold_in(rng, step): the same state and batch at another step
  count draw other dropout masks, so another loss (the loss is computed before the update:
  params, teacher, batch and the key are all it reads)."""
  cfg = moving_text_config(**{"model.encoder.dropout": 0.1})
  built = build_lib.build(cfg, devices=jax.devices()[:1])
  batch = build_lib.to_global(text_data.example_batch(cfg, cfg.batch_size), built.batch_shardings)
  losses = []
  for step in (0, 0, 5):
    state = built.init(0)
    state = state.replace(step=jax.device_put(jnp.int32(step), built.state_shardings.step))
    losses.append(float(built.step(state, batch)[1]["loss"]))
  assert losses[0] == losses[1]                                   # same key, same loss
  assert abs(losses[2] - losses[0]) > 1e-4 * abs(losses[0]), losses


SHARDED_STEPS = 5


@pytest.fixture(scope="module")
def single_device_run():
  """The 1-device reference of the sharded comparisons (the same for every mesh): 5 steps
  that change the model (no warm-up, tau 0.9)."""
  return run_steps(moving_text_config(), SHARDED_STEPS, devices=jax.devices()[:1])


@pytest.mark.parametrize("mesh", [dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=2, tensor=2),
                                  dict(data=1, fsdp=4, tensor=2)])
def test_sharded_step_equals_single_device(mesh, single_device_run):
  """8 fake devices vs 1 after 5 steps: losses within 1e-5 relative; params, teacher and Adam
  moments within 1e-5 (params, teacher: absolute, measured <= 9e-7; moments: of each leaf's
  scale, measured <= 1.5e-6; the gaps are reduction order). A gradient reduced over one data
  shard instead of all, or a shard's update lost, is off by O(1)."""
  cfg = moving_text_config(**{f"mesh.{k}": v for k, v in mesh.items()})
  sharded = run_steps(cfg, SHARDED_STEPS, devices=jax.devices()[:8])
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


def test_the_trainers_step_refuses_implicit_transfers():
  """train._loop dispatches the step under jax.transfer_guard("disallow"): a batch handed over
  as host numpy (an implicit copy) fails loudly; the explicit to_global one runs."""
  cfg = tiny_text_config()
  built = build_lib.build(cfg, devices=jax.devices()[:1])
  state = built.init(0)
  batch = text_data.example_batch(cfg, cfg.batch_size)
  with jax.transfer_guard("disallow"):
    with pytest.raises(Exception, match="[Dd]isallowed host-to-device transfer"):
      built.step(state, batch)
    state, m = built.step(state, build_lib.to_global(batch, built.batch_shardings))
    assert np.isfinite(float(jax.device_get(m["loss"])))
