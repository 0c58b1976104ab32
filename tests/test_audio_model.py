"""data2vec-audio model: parity with transformers' Data2VecAudioModel, HF import and export.

A random-init, perturbed tiny Data2VecAudioModel (eager attention, fp32) is imported into our
tree and run on a PADDED batch (odd lengths, attention_mask): every hidden state, every FFN
output (hook on feed_forward.output_dense, the data2vec target) and the masked (student)
forward agree on the valid frames to <= 1e-4. Our export loads into PyTorch with no
missing / unexpected weights and gives our outputs back.
"""

from __future__ import annotations

import jax
from flax.linen import meta as nn_meta
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from d2v_jax import config as config_lib  # noqa: E402
from d2v_jax.data import masking_audio  # noqa: E402
from d2v_jax.hf import audio as hf_audio, common  # noqa: E402
from d2v_jax.models import audio as audio_model  # noqa: E402
from d2v_jax.models import data2vec  # noqa: E402
from tests.hf_utils import max_abs, perturb_, torch_state  # noqa: E402

TOL = 1e-4
HIDDEN, LAYERS, HEADS, MLP, CONV, GROUPS = 32, 2, 2, 64, 32, 4
NUM_SAMPLES = 8000
LENGTHS = (8000, 6001, 4321)  # odd lengths: frame validity from the conv arithmetic


def _cfg(pos_kernel: int = 19, scan: bool = True):
  cfg = config_lib.load_file("configs/audio.py:variant=tiny")
  enc = cfg.model.encoder
  enc.num_layers, enc.hidden, enc.heads, enc.mlp_dim, enc.scan = LAYERS, HIDDEN, HEADS, MLP, scan
  cfg.model.conv_dims = (CONV,) * 7
  cfg.model.pos_conv_groups = GROUPS
  cfg.model.pos_conv_kernel = pos_kernel
  cfg.target.top_k = LAYERS
  cfg.data.max_samples = NUM_SAMPLES
  return cfg


def _hf_model(cfg, seed: int = 0, cls=None):
  hf_cfg = hf_audio.hf_config(cfg)
  hf_cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = (cls or transformers.Data2VecAudioModel)(hf_cfg).eval()
  perturb_(model, seed=seed, scale=0.05)
  return model


def _batch(cfg, seed: int = 0):
  rng = np.random.default_rng(seed)
  audio = rng.normal(size=(len(LENGTHS), NUM_SAMPLES)).astype(np.float32)
  valid = np.arange(NUM_SAMPLES)[None, :] < np.array(LENGTHS)[:, None]
  audio = np.where(valid, audio, 0.0).astype(np.float32)
  t = masking_audio.conv_output_length(NUM_SAMPLES, cfg.model.conv_kernels, cfg.model.conv_strides)
  frames = masking_audio.conv_output_length(np.array(LENGTHS), cfg.model.conv_kernels, cfg.model.conv_strides)
  import tensorflow as tf
  mask = masking_audio.span_mask(tf.constant([seed, 7]), tf.constant(frames), t, mask_prob=0.65,
                                 span=10).numpy()
  return {"audio": audio, "audio_len": np.array(LENGTHS, np.int32), "mask": mask}, valid


def _ours(cfg, params, batch, *, student: bool, collect: str, capture=("input_norm",)):
  """Our forward (jitted); returns (outputs, {module name: [captured outputs in call order]})."""
  cfg = config_lib.from_dict(config_lib.to_dict(cfg))
  cfg.target.layer_output = collect
  model = data2vec.build(cfg, audio_model.build(cfg))
  apply = jax.jit(lambda p, b: model.apply(
      {"params": p}, b, student=student, deterministic=True,
      capture_intermediates=lambda mdl, _: mdl.name in capture, mutable=["intermediates"]))
  out, state = apply(params, batch)
  found: dict = {}

  def walk(tree):
    for k, v in tree.items():
      if k in capture:
        found.setdefault(k, []).extend(v["__call__"])
      elif isinstance(v, dict):
        walk(v)
  walk(jax.tree_util.tree_map(np.asarray, state["intermediates"]))
  return out, found


def _params(cfg, hf_model, batch):
  """HF weights in our tree; the map must cover every embed / encoder parameter (same tree and
  shapes as our init, taken abstractly: nothing compiled). The head (not in HF) is zero."""
  model = data2vec.build(cfg, audio_model.build(cfg))
  abstract = nn_meta.unbox(jax.eval_shape(lambda k: model.init(
      {"params": k, "dropout": k}, batch, student=True, deterministic=True), jax.random.PRNGKey(0))["params"])
  loaded = common.from_hf_state(hf_audio, torch_state(hf_model), cfg)
  for key in ("embed", "encoder"):
    assert jax.tree_util.tree_structure(loaded[key]) == jax.tree_util.tree_structure(abstract[key])
    assert (jax.tree_util.tree_map(np.shape, loaded[key])
            == jax.tree_util.tree_map(lambda a: tuple(a.shape), abstract[key]))
  head = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, np.float32), abstract["head"])
  return {"head": head, **loaded}


def _hf_run(hf_model, batch, mask=None):
  ffn = []
  hooks = [layer.feed_forward.output_dense.register_forward_hook(lambda m, i, o: ffn.append(o.detach()))
           for layer in hf_model.encoder.layers]
  attn = torch.tensor(np.arange(NUM_SAMPLES)[None, :] < batch["audio_len"][:, None]).long()
  with torch.no_grad():
    out = hf_model(torch.tensor(batch["audio"]), attention_mask=attn, output_hidden_states=True,
                   mask_time_indices=None if mask is None else torch.tensor(mask))
  for h in hooks:
    h.remove()
  return out, [f.numpy() for f in ffn]


@pytest.mark.parametrize("pos_kernel", [19, 16])
def test_parity_padded_batch(pos_kernel):
  cfg = _cfg(pos_kernel, scan=False)  # unscanned: intermediates of every block can be captured
  batch, _ = _batch(cfg)
  hf_model = _hf_model(cfg)
  params = _params(cfg, hf_model, batch)
  hf_out, hf_ffn = _hf_run(hf_model, batch)

  ours, cap = _ours(cfg, params, batch, student=False, collect="end", capture=("input_norm", "fc2"))
  valid = np.asarray(ours["valid"])
  feat_mask = hf_model._get_feature_vector_attention_mask(
      hf_out.last_hidden_state.shape[1], torch.tensor(np.arange(NUM_SAMPLES)[None] < batch["audio_len"][:, None]))
  np.testing.assert_array_equal(valid, feat_mask.numpy())
  assert valid.sum(1).tolist() != [valid.shape[1]] * 3  # the batch really is padded

  hs = [h.numpy() for h in hf_out.hidden_states]
  errs = {"hidden_0": max_abs(cap["input_norm"][0], hs[0], valid)}
  for i in range(LAYERS):
    errs[f"hidden_{i + 1}"] = max_abs(ours["layers"][i], hs[i + 1], valid)
    errs[f"ffn_{i}"] = max_abs(cap["fc2"][i], hf_ffn[i], valid)
  errs["final"] = max_abs(ours["final"], hf_out.last_hidden_state.numpy(), valid)
  print("parity max abs:", errs)
  assert max(errs.values()) <= TOL, errs


def test_parity_student_mask():
  cfg = _cfg()
  batch, _ = _batch(cfg, seed=1)
  assert batch["mask"].any()
  hf_model = _hf_model(cfg, seed=1)
  params = _params(cfg, hf_model, batch)
  hf_out, hf_ffn = _hf_run(hf_model, batch, mask=batch["mask"])
  ours, _ = _ours(cfg, params, batch, student=True, collect="ffn")
  valid = np.asarray(ours["valid"])
  err = max(max_abs(ours["final"], hf_out.last_hidden_state.numpy(), valid),
            *(max_abs(ours["layers"][i], hf_ffn[i], valid) for i in range(LAYERS)))
  # the mask matters: the unmasked forward differs clearly
  teacher, _ = _ours(cfg, params, batch, student=False, collect="ffn")
  assert max_abs(teacher["final"], ours["final"], valid) > 1e-2
  print("student parity max abs:", err)
  assert err <= TOL


def test_export_loads_in_pytorch(tmp_path):
  cfg = _cfg()
  batch, _ = _batch(cfg, seed=2)
  # non-trivial weights everywhere (perturbed HF init) so a swapped or dropped leaf would show
  params = _params(cfg, _hf_model(cfg, seed=2), batch)
  out_dir = str(tmp_path / "hf")
  common.export(hf_audio, params, cfg, out_dir, str(tmp_path))

  model, info = transformers.Data2VecAudioModel.from_pretrained(
      out_dir, output_loading_info=True, attn_implementation="eager")
  assert info["missing_keys"] == [] and info["unexpected_keys"] == [], info
  assert info["mismatched_keys"] == []
  assert type(transformers.AutoModel.from_pretrained(out_dir)).__name__ == "Data2VecAudioModel"
  fe = transformers.AutoFeatureExtractor.from_pretrained(out_dir)
  assert type(fe).__name__ == "Wav2Vec2FeatureExtractor"
  assert (fe.do_normalize, fe.return_attention_mask, fe.sampling_rate, fe.feature_size, fe.padding_value) == (
      True, True, 16000, 1, 0.0)

  model.eval()
  hf_out, hf_ffn = _hf_run(model, batch)
  ours, _ = _ours(cfg, params, batch, student=False, collect="ffn")
  valid = np.asarray(ours["valid"])
  err = max(max_abs(ours["final"], hf_out.last_hidden_state.numpy(), valid),
            *(max_abs(ours["layers"][i], hf_ffn[i], valid) for i in range(LAYERS)))
  print("export parity max abs:", err)
  assert err <= TOL
  # round trip: our loader reads the exported directory back to the same weights
  back = common.load(hf_audio, out_dir, cfg)
  for key in ("embed", "encoder"):
    diff = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                  back[key], params[key])
    assert max(jax.tree_util.tree_leaves(diff)) == 0.0


def test_load_prefixed_unscanned_and_errors(tmp_path):
  cfg = _cfg(scan=False)
  hf_model = _hf_model(cfg, seed=3, cls=transformers.Data2VecAudioForCTC)
  hf_model.save_pretrained(str(tmp_path / "ctc"))
  params = common.load(hf_audio, str(tmp_path / "ctc"), cfg)
  assert "layers_1" in params["encoder"]
  np.testing.assert_array_equal(
      params["encoder"]["layers_1"]["block"]["fc2"]["kernel"],
      hf_model.data2vec_audio.encoder.layers[1].feed_forward.output_dense.weight.detach().numpy().T)
  np.testing.assert_array_equal(params["embed"]["mask_emb"],
                                hf_model.data2vec_audio.masked_spec_embed.detach().numpy())

  wrong = _cfg(pos_kernel=17, scan=False)
  with pytest.raises(ValueError,
                     match=r"encoder\.pos_conv_embed\.layers\.0\.conv\.weight.*\(32, 8, 19\).*\(32, 8, 17\)"):
    common.load(hf_audio, str(tmp_path / "ctc"), wrong)
  deeper = _cfg(scan=False)
  deeper.model.encoder.num_layers = 3
  with pytest.raises(ValueError, match=r"lacks 'encoder\.layers\.2\.attention\.q_proj\.weight'"):
    common.load(hf_audio, str(tmp_path / "ctc"), deeper)
  w2v = _cfg()
  w2v.model.pos_conv = "wav2vec2"
  with pytest.raises(config_lib.ConfigError, match="model.pos_conv='wav2vec2'"):
    hf_audio.hf_config(w2v)


def test_wav2vec2_pos_conv_matches_hf():
  """The config option pos_conv="wav2vec2" equals HF Wav2Vec2PositionalConvEmbedding (weight
  norm over the kernel axis, last frame dropped for an even kernel, GELU)."""
  from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2PositionalConvEmbedding
  k = 16
  hf_cfg = transformers.Wav2Vec2Config(hidden_size=HIDDEN, num_conv_pos_embeddings=k,
                                       num_conv_pos_embedding_groups=GROUPS)
  torch.manual_seed(0)
  hf = Wav2Vec2PositionalConvEmbedding(hf_cfg).eval()
  perturb_(hf, seed=0, scale=0.05)
  sd = torch_state(hf)
  g_key = next(n for n in sd if n.endswith("original0") or n.endswith("weight_g"))
  v_key = next(n for n in sd if n.endswith("original1") or n.endswith("weight_v"))
  params = {"weight_v": sd[v_key].transpose(2, 1, 0), "weight_g": sd[g_key].reshape(k),
            "bias": sd["conv.bias"]}
  x = np.random.default_rng(0).normal(size=(2, 23, HIDDEN)).astype(np.float32)
  with torch.no_grad():
    want = hf(torch.tensor(x)).numpy()
  conv = audio_model.WeightNormConv(HIDDEN, k, GROUPS)
  got = jax.nn.gelu(conv.apply({"params": params}, jnp.asarray(x))[:, :x.shape[1]], approximate=False)
  err = max_abs(got, want)
  print("wav2vec2 pos conv max abs:", err)
  assert got.shape == want.shape and err <= TOL


def test_group_norm_extractor_matches_hf_wav2vec2():
  """conv_norm="group" (wav2vec2 base: GroupNorm(C, C) on the first conv only) equals HF
  Wav2Vec2FeatureEncoder with feat_extract_norm="group"."""
  from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2FeatureEncoder
  hf_cfg = transformers.Wav2Vec2Config(conv_dim=(CONV,) * 7, feat_extract_norm="group")
  torch.manual_seed(0)
  hf = Wav2Vec2FeatureEncoder(hf_cfg).eval()
  for layer in hf.conv_layers:  # kaiming, as the HF pretrained-model init: O(1) activations
    torch.nn.init.kaiming_normal_(layer.conv.weight)
  perturb_(hf, seed=0, scale=0.05)
  sd = torch_state(hf)
  params = {}
  for i in range(7):
    layer = {"conv": {"kernel": sd[f"conv_layers.{i}.conv.weight"].transpose(2, 1, 0)}}
    if i == 0:
      layer["layer_norm"] = {"scale": sd["conv_layers.0.layer_norm.weight"],
                             "bias": sd["conv_layers.0.layer_norm.bias"]}
    params[f"conv_layers_{i}"] = layer
  x = np.random.default_rng(0).normal(size=(2, 4000)).astype(np.float32)
  with torch.no_grad():
    want = hf(torch.tensor(x)).numpy().transpose(0, 2, 1)
  k, s = hf_cfg.conv_kernel, hf_cfg.conv_stride

  def features(x):
    for i in range(7):
      x = audio_model.ConvLayer(CONV, k[i], s[i], False, "group" if i == 0 else "none",
                                name=f"conv_layers_{i}")(x)
    return x

  class Extractor(audio_model.nn.Module):
    @audio_model.nn.compact
    def __call__(self, x):
      return features(x)

  got = jax.jit(Extractor().apply)({"params": params}, jnp.asarray(x)[..., None])
  err = max_abs(got, want)
  print("group-norm extractor max abs:", err, "output max abs:", float(np.abs(want).max()))
  assert np.abs(want).max() > 0.1
  assert got.shape == want.shape and err <= TOL


def test_feature_grad_mult_scales_only_the_conv_gradient():
  """model.feature_grad_mult (fairseq GradMultiply): the local features are the same, the
  gradient into every conv layer is x 0.1 exactly, the projection's is unchanged."""
  audio = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4000)), jnp.float32)
  batch = {"audio": audio, "audio_len": jnp.array([4000, 3001])}
  out = {}
  for g in (1.0, 0.1):
    cfg = _cfg()
    cfg.model.feature_grad_mult = g
    embed = audio_model.build(cfg)
    params = embed.init(jax.random.PRNGKey(0), batch, method=embed.local)["params"]
    params = nn_meta.unbox(params)
    loss = lambda p: jnp.sum(jnp.sin(embed.apply({"params": p}, batch, method=embed.local)[0]))
    out[g] = jax.value_and_grad(loss)(params)
  (v1, g1), (v01, g01) = out[1.0], out[0.1]
  np.testing.assert_allclose(v01, v1, rtol=1e-5)
  for i in range(7):
    a, b = g1[f"conv_layers_{i}"], g01[f"conv_layers_{i}"]
    for leaf_a, leaf_b in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
      assert np.abs(leaf_a).max() > 0
      # float32: the two paths round differently; 1e-5 of the largest entry bounds that
      np.testing.assert_allclose(leaf_b, 0.1 * leaf_a, rtol=1e-4, atol=1e-5 * np.abs(leaf_a).max())
  pk = g1["projection"]["kernel"]   # 0.1 x + 0.9 x rounds like x to ~1e-6 in float32
  np.testing.assert_allclose(g01["projection"]["kernel"], pk, rtol=1e-5, atol=1e-5 * np.abs(pk).max())
