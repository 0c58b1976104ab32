"""EMA schedule values and one update (docs/algorithm.md §1.1)."""

import numpy as np
import jax.numpy as jnp

from d2v_jax import ema


def test_linear_anneal_then_flat():
  kw = dict(tau_start=0.999, tau_end=0.9999, anneal_steps=1000)
  assert np.isclose(float(ema.tau_at(0, **kw)), 0.999)
  assert np.isclose(float(ema.tau_at(500, **kw)), 0.99945, atol=1e-7)
  assert np.isclose(float(ema.tau_at(1000, **kw)), 0.9999)
  assert np.isclose(float(ema.tau_at(50_000, **kw)), 0.9999)


def test_constant_tau_for_vision_style_schedule():
  assert np.isclose(float(ema.tau_at(123, tau_start=0.9998, tau_end=0.9998, anneal_steps=0)), 0.9998)


def test_one_update_and_sharing():
  teacher = {"encoder": {"w": jnp.array([1.0, 2.0])}}
  student = {"encoder": {"w": jnp.array([3.0, 6.0])}, "embed": {"e": jnp.array([7.0])}}
  new = ema.ema_update(teacher, ema.teacher_view(student, teacher.keys()), 0.9)
  np.testing.assert_allclose(new["encoder"]["w"], [0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 6], rtol=1e-6)
  full = ema.teacher_params(student, new)
  # EMA subtree from the teacher, the rest shared with the student.
  np.testing.assert_allclose(full["encoder"]["w"], new["encoder"]["w"])
  np.testing.assert_allclose(full["embed"]["e"], [7.0])


def test_teacher_stays_float32_with_bfloat16_student():
  teacher = {"w": jnp.ones((3,), jnp.float32)}
  student = {"w": jnp.full((3,), 2.0, jnp.bfloat16)}
  new = ema.ema_update(teacher, student, 0.9999)
  assert new["w"].dtype == jnp.float32
  # 0.9999 * 1 + 0.0001 * 2 = 1.0001 is representable in float32, lost in bfloat16.
  np.testing.assert_allclose(new["w"], 1.0001, rtol=1e-7)


def test_weight_decay_mask_sees_through_the_layer_axis():
  import ml_collections
  from d2v_jax import optim
  o = ml_collections.ConfigDict(dict(decay_1d=False, no_decay=("cls",), decay=()))
  params = {"encoder": {"layers": {"block": {"fc1": {"kernel": np.zeros((2, 4, 8)), "bias": np.zeros((2, 8))}}}},
            "embed": {"cls": np.zeros((1, 1, 4)), "proj": {"kernel": np.zeros((4, 4)), "bias": np.zeros((4,))}}}
  mask = optim.decay_mask(o)(params)
  assert mask["encoder"]["layers"]["block"]["fc1"] == {"kernel": True, "bias": False}
  assert mask["embed"] == {"cls": False, "proj": {"kernel": True, "bias": False}}
  o.decay = ("cls",)  # optim.decay wins over no_decay and the 1-D rule (BEiT's mask token)
  assert optim.decay_mask(o)(params)["embed"]["cls"] is True
  o.decay = ()
  o.decay_1d = True
  assert optim.decay_mask(o)(params)["encoder"]["layers"]["block"]["fc1"]["bias"] is True
