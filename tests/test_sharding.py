"""Mesh presets, multislice layout, the start-up report and mesh / batch errors.

The explicit meshes (8,1,1), (2,2,2), (1,4,2) are checked against one device in
tests/test_step.py; here the same check runs through the presets (dp, fsdp, fsdp_tp).
"""

import importlib.util
import types


import jax
import numpy as np
import pytest

from d2v_jax import build as build_lib, sharding
from step_utils import (MOVING, assert_same_training, run_steps, step_once_keeps_shardings,
                        tiny_text_config)

PRESET_MESHES = {"dp": (8, 1, 1), "fsdp": (1, 8, 1), "fsdp_tp": (1, 4, 2)}
STEPS = 5


# One layer keeps the four compiles of the parity tests cheap (the sharding rules of a layer
# do not depend on how many there are); MOVING: no warm-up, tau 0.9, so every step changes
# the student and the teacher (tests/step_utils.py).
ONE_LAYER = {"model.encoder.num_layers": 1, "target.top_k": 1, **MOVING}


def _preset_cfg(preset: str, **overrides):
  return tiny_text_config(**{"mesh.preset": preset, "mesh.tensor": 2 if preset == "fsdp_tp" else 1},
                          **overrides)


@pytest.fixture(scope="module")
def single_device_run():
  return run_steps(tiny_text_config(**ONE_LAYER), STEPS, devices=jax.devices()[:1])


def test_presets_resolve_to_mesh_shapes():
  for preset, want in PRESET_MESHES.items():
    assert sharding.mesh_shape(_preset_cfg(preset).mesh, 8) == want
  # Two slices: data spans the slices, fsdp stays inside each one.
  assert sharding.mesh_shape(_preset_cfg("fsdp").mesh, 16, slices=2) == (2, 8, 1)
  assert sharding.mesh_shape(_preset_cfg("dp").mesh, 16, slices=2) == (16, 1, 1)
  # No preset: the explicit sizes of d2v_jax/recipe.py (data=-1) are used.
  assert sharding.mesh_shape(tiny_text_config().mesh, 8) == (8, 1, 1)


@pytest.mark.parametrize("preset", list(PRESET_MESHES))
def test_preset_step_equals_single_device(preset, single_device_run):
  """8 fake devices vs 1 after 5 steps that change the model: losses within 1e-5 relative;
  params and teacher within 1e-5, Adam moments within 1e-5 of each leaf's scale (the gaps are
  reduction order, <= 1.5e-6 in tests/test_step.py); every output leaf keeps its declared
  sharding."""
  cfg = _preset_cfg(preset, **ONE_LAYER)
  sharded = run_steps(cfg, STEPS, devices=jax.devices()[:8])
  built = sharded[2]
  assert tuple(built.mesh.shape.values()) == PRESET_MESHES[preset]
  assert_same_training(single_device_run, sharded, 1e-5)
  out = step_once_keeps_shardings(cfg, built)

  # The teacher tree has exactly the sharding of the student subtree it mirrors.
  sh = built.state_shardings
  for k in sh.teacher:
    student = jax.tree_util.tree_leaves(sh.params[k])
    teacher = jax.tree_util.tree_leaves(sh.teacher[k])
    assert [s.spec for s in teacher] == [s.spec for s in student]
  for leaf in jax.tree_util.tree_leaves(out.teacher):
    assert leaf.sharding.mesh.shape == built.mesh.shape

  # What is sharded follows the preset: the word embedding table [vocab 96, embed 64].
  table = sh.params["embed"]["word"]["embedding"]
  assert table.shard_shape((96, 64)) == {"dp": (96, 64), "fsdp": (96, 8), "fsdp_tp": (48, 16)}[preset]


# Tiny text model (tests/step_utils.py): vocab 96, 514 positions, hidden 64, mlp 256, 2
# layers, 2-layer head (x2). Hand count of its parameters:
#   embed    96*64 + 514*64 + 1*64 + 2*64                             =  39232
#   encoder  2 * (3*(64*64+64) + 64*64+64 + 2*128 + 64*256+256 + 256*64+64) =  99968
#   head     64*128+128 + 128*64+64                                   =  16576
# Under fsdp=8 every tensor with an `embed` axis is split 8 ways; what has no `embed` axis
# stays whole: q/k/v biases [2, 64] x 3, fc1 bias [2, 256], head dense_0 bias [128].
N_PARAMS, N_ENCODER, N_WHOLE, N_WHOLE_ENCODER = 155776, 99968, 3 * 128 + 512 + 128, 3 * 128 + 512


def _report(preset):
  built = build_lib.build(_preset_cfg(preset), devices=jax.devices()[:8])
  return sharding.report(built.state_shardings, built.abstract_state)


def test_report_counts_per_device_bytes_and_replicated_params():
  sizes, repl = _report("dp")
  assert sizes["params"] == 4 * N_PARAMS
  assert sizes["teacher"] == 4 * N_ENCODER
  # Adam: two moments per parameter plus int32 step counters.
  assert 2 * 4 * N_PARAMS <= sizes["opt_state"] <= 2 * 4 * N_PARAMS + 64
  assert len(repl) == 25                         # every parameter with more than one element

  sizes, repl = _report("fsdp")
  assert sizes["params"] == 4 * ((N_PARAMS - N_WHOLE) // 8 + N_WHOLE)
  assert sizes["teacher"] == 4 * ((N_ENCODER - N_WHOLE_ENCODER) // 8 + N_WHOLE_ENCODER)
  assert 2 * sizes["params"] <= sizes["opt_state"] <= 2 * sizes["params"] + 64
  assert sorted(repl) == sorted([
      "['encoder']['layers']['block']['attention']['key']['bias']",
      "['encoder']['layers']['block']['attention']['query']['bias']",
      "['encoder']['layers']['block']['attention']['value']['bias']",
      "['encoder']['layers']['block']['fc1']['bias']",
      "['head']['dense_0']['bias']"])


def test_mesh_that_does_not_divide_the_devices_names_both_numbers():
  cfg = tiny_text_config(**{"mesh.data": 3, "mesh.fsdp": -1})
  with pytest.raises(sharding.MeshError, match=r"8 is not divisible by 3"):
    sharding.make_mesh(cfg.mesh, jax.devices()[:8])
  cfg = tiny_text_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 1})
  with pytest.raises(sharding.MeshError, match=r"needs 4 devices but 8 are available"):
    sharding.make_mesh(cfg.mesh, jax.devices()[:8])
  with pytest.raises(sharding.MeshError, match=r"needs mesh.tensor >= 2"):
    sharding.make_mesh(tiny_text_config(**{"mesh.preset": "fsdp_tp"}).mesh, jax.devices()[:8])
  with pytest.raises(sharding.MeshError, match=r"mesh.preset='zero3' is unknown"):
    sharding.make_mesh(tiny_text_config(**{"mesh.preset": "zero3"}).mesh, jax.devices()[:8])
  with pytest.raises(sharding.MeshError, match=r"form 1 slice"):
    sharding.make_mesh(tiny_text_config(**{"mesh.dcn_data": 2}).mesh, jax.devices()[:8])


def test_batch_that_does_not_divide_the_mesh_names_both_numbers():
  mesh = sharding.make_mesh(_preset_cfg("fsdp_tp").mesh, jax.devices()[:8])   # 1 x 4 x 2
  sharding.check_batch(12, mesh)               # 4 batch shards: fine
  with pytest.raises(sharding.MeshError, match=r"batch_size=10 is not divisible by the 4 batch shards"):
    sharding.check_batch(10, mesh)
  with pytest.raises(sharding.MeshError, match=r"batch_size=12 is not divisible by the 8 processes"):
    sharding.check_batch(12, mesh, process_count=8)


def _fake_devices(slices: int, per_slice: int):
  return [types.SimpleNamespace(id=s * 100 + i, slice_index=s) for s in range(slices)
          for i in range(per_slice)]


def test_hybrid_layout_keeps_each_slice_contiguous_on_the_dcn_axis():
  devs = _fake_devices(2, 4)
  arr = sharding._hybrid((2, 2, 1), (2, 1, 1), devs)      # data = 2 slices x 2, fsdp = 2
  assert arr.shape == (4, 2, 1)
  slice_of = np.vectorize(lambda d: d.slice_index)(arr)
  np.testing.assert_array_equal(slice_of[:, :, 0], [[0, 0], [0, 0], [1, 1], [1, 1]])
  arr = sharding._hybrid((1, 4, 1), (1, 2, 1), devs)      # fsdp spans both slices
  np.testing.assert_array_equal(np.vectorize(lambda d: d.slice_index)(arr)[0, :, 0],
                                [0, 0, 0, 0, 1, 1, 1, 1])


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed (requirements-tpu.txt): no TPU topology devices")
def test_multislice_mesh_on_tpu_topology():
  from d2v_jax import topology as compile_lib
  devs = compile_lib.topology_devices(compile_lib.parse_topology("v5e-4", num_slices=2))
  assert sharding.num_slices(devs) == 2
  mesh = sharding.make_mesh(_preset_cfg("fsdp").mesh, devs)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  np.testing.assert_array_equal(slice_of[:, :, 0], [[0] * 4, [1] * 4])
