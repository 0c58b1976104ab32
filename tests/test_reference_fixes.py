"""Issue 13 model-side fixes: the audio teacher reads the student's conv features (no CNN in
the teacher), data2vec_vision's initialisation, and the EMA step index of fairseq."""

import jax
import jax.numpy as jnp
import numpy as np

from d2v_jax import build as build_lib, config as config_lib, ema, objectives, targets as T


def _audio_built():
  cfg = config_lib.load_file("configs/audio.py:variant=tiny")
  cfg.data.buckets = ()
  cfg.data.max_samples, cfg.data.min_samples = 8000, 4000
  cfg.batch_size = 2
  return build_lib.build(cfg, devices=jax.devices()[:1])


def _conv_layer0_count(jaxpr, cin: int = 1, kernel: int = 10) -> int:
  """conv_general_dilated eqns whose kernel is the CNN's first layer [10, 1, C] (WIO)."""
  n = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      shape = eqn.invars[1].aval.shape
      n += int(shape[0] == kernel and shape[1] == cin)
    for sub in jax.core.jaxprs_in_params(eqn.params):
      n += _conv_layer0_count(sub, cin, kernel)
  return n


def test_audio_teacher_runs_no_cnn_and_keeps_its_targets():
  built = _audio_built()
  cfg, model = built.cfg, built.model
  assert cfg.teacher.share_local
  state = built.init(0)
  rng = np.random.default_rng(0)
  batch = built.modality.data.example_batch(cfg, 2)
  batch["audio"] = rng.normal(size=batch["audio"].shape).astype(np.float32)
  batch["audio_len"] = np.array([8000, 5001], np.int32)
  batch = jax.tree_util.tree_map(jnp.asarray, batch)
  # Targets of the shared-feature teacher == the previous, self-contained teacher forward.
  y_new, valid = objectives.teacher_targets(model, state.params, state.teacher, batch, cfg)
  out = model.apply({"params": ema.teacher_params(state.params, state.teacher)}, batch,
                    student=False, deterministic=True)
  y_old = T.targets_from_config(out["layers"], out["valid"], cfg.target)
  np.testing.assert_allclose(np.asarray(y_new), np.asarray(y_old), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(valid), np.asarray(out["valid"]))
  # The whole v1 forward (student + teacher) holds the first CNN layer once: the student's.
  def convs():   # a fresh function per trace: jax caches traces by function
    fwd = lambda p: objectives.v1(model, p, state.teacher, batch, jax.random.PRNGKey(0), cfg)[0]
    return _conv_layer0_count(jax.make_jaxpr(fwd)(state.params).jaxpr)
  assert convs() == 1
  cfg.teacher.share_local = False   # the former teacher: its own CNN forward
  assert convs() == 2


def test_vision_init_is_data2vec_vision():
  """trunc_normal_(std 0.02) cut at +-1 std (sample std ~0.0108) for every Linear, the patch
  conv and the tokens; block l's attention-out and fc2 kernels divided by sqrt(2 l)."""
  cfg = config_lib.load_file("configs/vision.py:variant=small")
  cfg.model.image_size, cfg.model.patch_size = 64, 8
  built = build_lib.build(cfg, devices=jax.devices()[:1])
  p = jax.device_get(built.init(0).params)
  want = 0.02 * 0.5377   # std of N(0, 1) truncated to [-1, 1]
  for leaf in (p["embed"]["patch"]["kernel"], p["encoder"]["layers"]["block"]["fc1"]["kernel"],
               p["head"]["out"]["kernel"], p["encoder"]["layers"]["block"]["attention"]["query"]["kernel"]):
    assert np.abs(leaf).max() <= 0.02 + 1e-7
    np.testing.assert_allclose(leaf.std(), want, rtol=0.03)
  for name in ("fc2", "out"):
    k = (p["encoder"]["layers"]["block"][name] if name == "fc2"
         else p["encoder"]["layers"]["block"]["attention"][name])["kernel"]
    for layer in range(k.shape[0]):
      scale = np.sqrt(2.0 * (layer + 1))
      assert np.abs(k[layer]).max() <= 0.02 / scale + 1e-7
      np.testing.assert_allclose(k[layer].std() * scale, want, rtol=0.05)
  for tok in ("cls_token", "mask_token"):
    assert np.abs(p["embed"][tok]).max() <= 0.02 + 1e-7
  cfg.model.init = "bert"
  q = jax.device_get(build_lib.build(cfg, devices=jax.devices()[:1]).init(0).params)
  np.testing.assert_allclose(q["encoder"]["layers"]["block"]["fc2"]["kernel"].std(), 0.02, rtol=0.03)


def test_ema_uses_the_update_count_after_the_step():
  """fairseq: after update n (1-based) the EMA uses tau(n); tau(1) for the first update."""
  cfg = config_lib.load_file("configs/text.py:variant=tiny")
  cfg.model.vocab_size, cfg.data.block_size, cfg.batch_size = 64, 16, 2
  cfg.teacher.tau_start, cfg.teacher.tau_end, cfg.teacher.anneal_steps = 0.5, 1.0, 4
  built = build_lib.build(cfg, devices=jax.devices()[:1])
  state = built.init(0)
  batch = build_lib.to_global(built.modality.data.example_batch(cfg, 2), built.batch_shardings)
  taus = []
  for _ in range(5):
    state, m = built.step(state, batch)
    taus.append(float(m["tau"]))
  np.testing.assert_allclose(taus, [0.625, 0.75, 0.875, 1.0, 1.0], rtol=1e-6)
  # tau = 1: the teacher does not move (the update is skipped).
  before = jax.device_get(state.teacher)
  state, _ = built.step(state, batch)
  for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(jax.device_get(state.teacher))):
    np.testing.assert_array_equal(a, b)

