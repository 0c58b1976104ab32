"""Named remat policies (model.encoder.remat, transformer.remat_policy) and scan=False change
memory, not numbers: each trains exactly like the default, and the compiled temporaries are
ordered as the policies keep less (moved here from tests/test_sharding.py and extended)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2v_jax import build as build_lib
from d2v_jax.data import text as text_data
from d2v_jax.models import transformer
from step_utils import assert_same_training, moving_text_config, run_steps, tiny_text_config

# Steps that change the model (tests/step_utils.py MOVING: no warm-up, tau 0.9).
STEPS = 5


def _temp_bytes(cfg) -> int:
  """Temporary bytes of the compiled step on one device (XLA:CPU memory analysis)."""
  built = build_lib.build(cfg, devices=jax.devices()[:1])
  state = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                 built.abstract_state, built.state_shardings)
  batch = build_lib.abstract_batch(cfg, built.modality, built.batch_shardings)
  return built.step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes


def test_policy_names():
  assert transformer.remat_policy("dots")[0] == "save_dots"          # the old name still works
  for name in transformer.REMAT_POLICIES:
    canon, policy = transformer.remat_policy(name)
    assert canon == name and (policy is None) == (name == "none")
  with pytest.raises(ValueError, match="use one of"):
    transformer.remat_policy("everything")


def test_every_remat_policy_trains_like_the_default():
  """Each policy (dropout on: the recomputation redraws the same masks) gives the default's
  encoder outputs and parameter gradients to 1e-5 (the encoder is all that remat wraps; one
  small compile per policy); the whole train step under `full` gives the default's losses,
  parameters, teacher and Adam moments after 5 steps that change the model to 1e-5
  (tests/step_utils.py assert_same_training: params absolute, moments per leaf)."""
  cfg = moving_text_config()
  x = jax.random.normal(jax.random.PRNGKey(0), (4, cfg.data.block_size, cfg.model.encoder.hidden))
  weights = jax.random.normal(jax.random.PRNGKey(1), x.shape)

  def value_and_grad(remat):
    spec = dataclasses.replace(transformer.EncoderSpec.from_config(cfg.model.encoder), remat=remat)
    enc = transformer.Encoder(spec)
    params = enc.init({"params": jax.random.PRNGKey(2)}, x, None, True)["params"]

    def loss(p):
      out, layers = enc.apply({"params": p}, x, None, False, rngs={"dropout": jax.random.PRNGKey(3)})
      return jnp.sum(out * weights) + jnp.sum(layers * weights)
    return jax.jit(jax.value_and_grad(loss))(params)

  base_v, base_g = value_and_grad("none")
  for remat in ("full", "minimal", "dots", "save_qkv_out", "offload"):
    v, g = value_and_grad(remat)
    np.testing.assert_allclose(v, base_v, rtol=1e-5, err_msg=remat)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(base_g)):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=remat)
  base = run_steps(cfg, STEPS, devices=jax.devices()[:1])
  run = run_steps(moving_text_config(**{"model.encoder.remat": "full"}), STEPS, devices=jax.devices()[:1])
  assert_same_training(base, run, 1e-5)


def test_scan_false_trains_like_scan():
  """scan=False names the layers layers_0.. (and draws other random numbers): from the same
  weights, unstacked, with no dropout, 5 steps that change the model give the same losses to
  1e-5 and the same params, teacher and Adam moments (restacked) as the scanned run
  (tests/step_utils.py assert_same_training)."""
  quiet = {"model.encoder.dropout": 0.0, "model.encoder.attention_dropout": 0.0,
           "model.embed_dropout": 0.0}
  scanned_cfg = moving_text_config(**quiet)
  unscanned_cfg = moving_text_config(**quiet, **{"model.encoder.scan": False})
  scanned = run_steps(scanned_cfg, STEPS, devices=jax.devices()[:1])
  built = build_lib.build(unscanned_cfg, devices=jax.devices()[:1])
  start = build_lib.build(scanned_cfg, devices=jax.devices()[:1]).init(scanned_cfg.seed)
  n = scanned_cfg.model.encoder.num_layers

  def unstack(tree):
    if not isinstance(tree, dict):
      return tree
    out = {k: unstack(v) for k, v in tree.items() if k != "layers"}
    for i in range(n):
      if "layers" in tree:
        out[f"layers_{i}"] = jax.tree_util.tree_map(lambda x: x[i], tree["layers"])
    return out

  def restack(tree):
    """Inverse of unstack, on any params-shaped dict (params, teacher, Adam moments)."""
    if not isinstance(tree, dict):
      return tree
    out = {k: restack(v) for k, v in tree.items() if not k.startswith("layers_")}
    if "layers_0" in tree:
      out["layers"] = jax.tree_util.tree_map(lambda *xs: np.stack(xs),
                                             *[tree[f"layers_{i}"] for i in range(n)])
    return out

  own = built.init(unscanned_cfg.seed)
  state = own.replace(params=unstack(jax.device_get(start.params)),
                      teacher=unstack(jax.device_get(start.teacher)))
  state = jax.device_put(state, built.state_shardings)
  batch = build_lib.to_global(text_data.example_batch(unscanned_cfg, unscanned_cfg.batch_size),
                              built.batch_shardings)
  metrics = []
  for _ in range(STEPS):
    state, m = built.step(state, batch)
    metrics.append({"loss": float(m["loss"])})
  state = jax.device_get(state)
  opt = jax.tree_util.tree_map(restack, state.opt_state, is_leaf=lambda x: isinstance(x, dict))
  unscanned = (state.replace(params=restack(state.params), teacher=restack(state.teacher),
                             opt_state=opt), metrics, built)
  assert_same_training(scanned, unscanned, 1e-5)


def test_compiled_temporaries_follow_what_each_policy_keeps():
  """Tiny text at 256 tokens, 4 layers, batch 8, float32 (XLA:CPU; measured MiB): none 96.9,
  save_dots 74.3, minimal 58.3, save_qkv_out 48.3, full 40.3; offload = minimal here (the CPU's
  pinned host memory is the same memory). Asserted: full <= save_qkv_out <= minimal <=
  save_dots <= none, offload <= minimal, and full < 0.8 x none."""
  long = {"data.block_size": 256, "batch_size": 8, "model.encoder.num_layers": 4}
  temp = {r: _temp_bytes(tiny_text_config(**long, **{"model.encoder.remat": r}))
          for r in ("none", "save_dots", "minimal", "save_qkv_out", "full", "offload")}
  order = ["full", "save_qkv_out", "minimal", "save_dots", "none"]
  assert [temp[r] for r in order] == sorted(temp[r] for r in order), temp
  assert temp["offload"] <= temp["minimal"], temp
  assert temp["full"] < 0.8 * temp["none"], temp
