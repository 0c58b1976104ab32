"""The model's CPU-only speed-ups (d2v_jax/models/cpu_ops.py) are chosen when the model is built
for a CPU mesh: a model built for a TPU mesh (an ahead-of-time compile from this CPU host)
holds XLA's grouped convolution and plain weight gradients only, one built for CPU the
stacked-taps matmul, forward-conv gradients and the barriered transposes; the layer scan
unrolls on CPU only; the CPU threefry kernel gives the same bits. (Conv equality with
nn.Conv: tests/test_v2.py.)"""

import importlib.util
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from d2v_jax import build as build_lib
from d2v_jax.models import cpu_ops
from step_utils import tiny_text_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hlo(f, platform: str, *args) -> str:
  return export.export(jax.jit(f), platforms=[platform])(*args).mlir_module()


@pytest.mark.parametrize("ndim", [1, 2])
def test_grouped_conv_forms_per_build_platform(ndim):
  x = jnp.ones((2,) + (6,) * ndim + (16,))
  w = jnp.ones((3,) * ndim + (4, 16))
  assert (cpu_ops.impl_for("cpu"), cpu_ops.impl_for("tpu"), cpu_ops.impl_for("gpu")) == ("cpu", "xla", "xla")

  def grads(impl):
    conv = (lambda x, w: cpu_ops.conv1d(x, w, (1, 1), 4, impl)) if ndim == 1 else (
        lambda x, w: cpu_ops.conv2d(x, w, 4, impl))
    return jax.grad(lambda x, w: (conv(x, w) ** 2).sum(), argnums=(0, 1))
  for platform in ("tpu", "cuda"):
    hlo = _hlo(grads(cpu_ops.impl_for("tpu")), platform, x, w)
    assert "stablehlo.convolution" in hlo and "feature_group_count = 4" in hlo, platform
  cpu = _hlo(grads(cpu_ops.impl_for("cpu")), "cpu", x, w)
  if ndim == 2:   # the taps matmul: no convolution at all on CPU
    assert "stablehlo.convolution" not in cpu and "stablehlo.dot_general" in cpu
  else:   # forward convolutions only: XLA's own kernel gradient is a batch-grouped conv
    xla = _hlo(grads("xla"), "tpu", x, w)
    assert "batch_group_count = 4" not in cpu and "batch_group_count = 4" in xla


def test_unroll_policy():
  assert cpu_ops.unroll("cpu", 12, 0, remat=False) == 12
  assert cpu_ops.unroll("tpu", 12, 0, remat=False) == 1
  assert cpu_ops.unroll("gpu", 12, 0, remat=False) == 1
  assert cpu_ops.unroll("cpu", 12, 0, remat=True) == 1       # CSE would undo the remat
  assert cpu_ops.unroll("tpu", 12, 3, remat=False) == 3      # model.encoder.scan_unroll wins


def test_model_is_built_for_the_mesh_platform():
  built = build_lib.build(tiny_text_config(), devices=jax.devices()[:1])
  assert built.model.spec.platform == "cpu"
  jaxpr = jax.make_jaxpr(built.step_fn)(built.abstract_state, built.modality.data.example_batch(built.cfg, 8))
  unrolls = [e.params["unroll"] for e in jaxpr.jaxpr.eqns for e in _walk(e) if e.primitive.name == "scan"]
  assert unrolls and all(u == built.cfg.model.encoder.num_layers for u in unrolls), unrolls


def _walk(eqn):
  yield eqn
  for v in eqn.params.values():
    for j in (v if isinstance(v, (list, tuple)) else (v,)):
      inner = getattr(j, "jaxpr", None)
      inner = getattr(inner, "jaxpr", inner) if inner is not None else None
      for e in getattr(inner, "eqns", []):
        yield from _walk(e)


def test_dense_matches_nn_dense_and_its_cpu_gradient_is_cpu_only():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 24))
  ours, plain, ref = cpu_ops.Dense(40, cpu=True), cpu_ops.Dense(40), nn.Dense(40)
  p = ref.init(jax.random.PRNGKey(1), x)
  loss = lambda m: lambda p, x: (m.apply(p, x) ** 2).sum()
  np.testing.assert_allclose(ours.apply(p, x), ref.apply(p, x), rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(jax.grad(loss(ours), argnums=(0, 1))(p, x)),
                  jax.tree_util.tree_leaves(jax.grad(loss(ref), argnums=(0, 1))(p, x))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert "optimization_barrier" in _hlo(jax.grad(loss(ours)), "cpu", p, x)
  assert "optimization_barrier" not in _hlo(jax.grad(loss(plain)), "cpu", p, x)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed (pip install -r requirements-tpu.txt)")
def test_a_step_built_for_tpu_holds_no_cpu_form():
  """The v2 text step built for a v5e-4 mesh from this CPU host (the AOT path): its lowered
  program has neither the barriered CPU weight gradient nor the forward-conv decoder
  gradients; the same step built for the CPU mesh has both."""
  from d2v_jax.topology import parse_topology, target_devices
  from d2v_jax import sharding
  cfg = tiny_text_config(objective="v2")
  cfg.v2.clone_batch, cfg.v2.mask_prob, cfg.v2.decoder.groups, cfg.v2.decoder.dim = 2, 0.5, 4, 64
  devices, backend = target_devices(parse_topology("v5e-4"))
  if backend != "tpu":
    pytest.skip(f"no TPU compiler: {backend}")
  texts = {}
  for name, mesh in (("tpu", sharding.make_mesh(cfg.mesh, devices)), ("cpu", None)):
    built = build_lib.build(cfg, mesh=mesh, devices=None if mesh else jax.devices()[:1])
    assert built.model.spec.on_cpu == (name == "cpu")
    texts[name] = built.step.lower(built.abstract_state,
                                   build_lib.abstract_batch(cfg, built.modality, built.batch_shardings)).as_text()
  assert "optimization_barrier" not in texts["tpu"] and "optimization_barrier" in texts["cpu"]
  assert "batch_group_count" in texts["tpu"]


FAST_THREEFRY = """
import hashlib, jax, numpy as np
from d2v_jax.models import cpu_ops
f = jax.jit(lambda k: jax.random.bits(k, (4096,)))
k = jax.random.PRNGKey(7)
hlo = lambda: f.lower(k).compile().as_text()
before, loop_before = np.asarray(f(k)), "while" in hlo()
assert cpu_ops.fast_threefry() and cpu_ops.fast_threefry()   # once, idempotent
jax.clear_caches()
after, loop_after = np.asarray(f(k)), "while" in hlo()
print(loop_before, loop_after, bool((before == after).all()))
"""


def test_fast_threefry_gives_the_same_bits_without_the_loop():
  """A fresh process (the registration lasts the process): the CPU kernel of jax.random.bits
  loses its rolled loop and gives the same bits."""
  out = subprocess.run([sys.executable, "-c", FAST_THREEFRY], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["True", "False", "True"]
