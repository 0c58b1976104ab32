"""data2vec-vision model + HF map: parity with transformers Data2VecVisionModel (PyTorch),
export loading in PyTorch / FlaxBeitModel / TFData2VecVisionModel, teacher targets."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict
from transformers import AutoImageProcessor, AutoModel, Data2VecVisionModel

from d2v_jax import config as config_lib, ema, step as step_lib, targets
from d2v_jax.hf import common
from d2v_jax.hf import vision as hf_vision
from d2v_jax.models import data2vec, vision
from hf_utils import max_abs, perturb_, torch_state

TOL = 1e-4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE, PATCH = 32, 8      # 4 x 4 patches
GRID = IMAGE // PATCH


def tiny_cfg(scan: bool = True, layers: int = 2, layer_scale: float = 0.1):
  cfg = config_lib.load_file(os.path.join(ROOT, "configs", "vision.py") + ":variant=tiny")
  cfg.model.image_size, cfg.model.patch_size = IMAGE, PATCH
  # layer scale 0.1 instead of 1e-4: the blocks must visibly matter in a parity test.
  cfg.model.encoder.update(num_layers=layers, hidden=32, heads=2, mlp_dim=64,
                           layer_scale=layer_scale, scan=scan)
  cfg.target.top_k = min(2, layers)
  cfg.data.num_mask_patches = 7
  cfg.data.min_mask_block = 4
  return cfg


def our_model(cfg):
  return data2vec.build(cfg, vision.build(cfg))


@functools.lru_cache(maxsize=None)
def _compiled(layers: int, scan: bool):
  """Jitted init / forward / embed of tiny_cfg(scan, layers), compiled once per test session
  (eager nn.scan recompiles on every call)."""
  model = our_model(tiny_cfg(scan=scan, layers=layers))
  init = jax.jit(lambda rng, batch: model.init(rng, batch, student=True)["params"])
  fwd = jax.jit(lambda p, batch, student: model.apply({"params": p}, batch, student=student),
                static_argnums=2)
  emb = jax.jit(lambda p, batch, student: model.embed.apply({"params": p}, batch, student=student,
                                                            deterministic=True), static_argnums=2)
  return init, fwd, emb


def _fns(cfg):
  enc = cfg.model.encoder
  return _compiled(enc.num_layers, enc.scan)


def photos(n: int = 2) -> np.ndarray:
  """Real photos (scikit-image samples) resized to IMAGE px, ImageNet-normalised, NHWC."""
  import skimage.data
  from PIL import Image
  out = []
  for name in ("astronaut", "coffee", "chelsea", "rocket")[:n]:
    img = Image.fromarray(getattr(skimage.data, name)()).resize((IMAGE, IMAGE), Image.BICUBIC)
    out.append(np.asarray(img, np.float32) / 255.0)
  x = np.stack(out)
  return ((x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])).astype(np.float32)


def masks(n: int = 2) -> np.ndarray:
  rng = np.random.default_rng(1)
  return rng.random((n, GRID * GRID)) < 0.5


def hf_model(cfg, seed: int = 0) -> Data2VecVisionModel:
  """Random-init Data2VecVisionModel with every weight perturbed (HF zero-inits the relative
  position table, CLS and mask tokens; a map that dropped them would pass unperturbed)."""
  torch.manual_seed(seed)
  model = Data2VecVisionModel(hf_vision.hf_config(cfg), add_pooling_layer=False).eval()
  perturb_(model, seed, 0.05)
  return model


def full_params(cfg, loaded: dict, seed: int = 0) -> dict:
  """{'embed', 'encoder'} from a load + a freshly initialised regression head."""
  batch = {"image": jnp.asarray(photos()), "mask": jnp.asarray(masks())}
  head = _fns(cfg)[0](jax.random.PRNGKey(seed), batch)["head"]
  return {**loaded, "head": common.unbox(head)}


def random_params(cfg, seed: int = 0) -> dict:
  """Our init with every leaf perturbed (zero-initialised tables / biases included)."""
  batch = {"image": jnp.asarray(photos()), "mask": jnp.asarray(masks())}
  params = common.unbox(_fns(cfg)[0](jax.random.PRNGKey(seed), batch))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda x: (x + rng.normal(0, 0.05, x.shape)).astype(np.float32), params)


def run_hf(model, x, mask=None):
  with torch.no_grad():
    out = model(torch.tensor(x).permute(0, 3, 1, 2),
                bool_masked_pos=None if mask is None else torch.tensor(mask),
                output_hidden_states=True)
  return [h.numpy() for h in out.hidden_states], out.last_hidden_state.numpy()


def run_ours(cfg, params, x, mask=None):
  _, fwd, embed = _fns(cfg)
  batch = {"image": jnp.asarray(x), "mask": jnp.asarray(masks() if mask is None else mask)}
  student = mask is not None
  emb, _, _ = embed(params["embed"], batch, student)
  out = fwd(params, batch, student)
  return [np.asarray(emb)] + list(np.asarray(out["layers"])), np.asarray(out["final"])


# ------------------------------------------------------------------------------ embedder


@pytest.mark.parametrize("grid", [(2, 2), (4, 4), (14, 14), (3, 5)])
def test_relative_position_index_matches_hf(grid):
  from transformers.models.beit.modeling_flax_beit import relative_position_index_init
  from transformers.models.data2vec.modeling_data2vec_vision import Data2VecVisionRelativePositionBias
  cfg = hf_vision.hf_config(tiny_cfg())
  torch_idx = Data2VecVisionRelativePositionBias(cfg, window_size=grid).generate_relative_position_index(grid)
  ours = vision.relative_position_index(*grid)
  np.testing.assert_array_equal(ours, torch_idx.numpy())
  np.testing.assert_array_equal(ours, np.asarray(relative_position_index_init(grid)))
  r = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
  assert ours[0, 0] == r - 1 and ours[0, 1] == r - 3 and ours[1, 0] == r - 2
  assert ours.max() == r - 1 and np.all(np.diag(ours)[1:] == (grid[0] - 1) * (2 * grid[1] - 1) + grid[1] - 1)


def test_embed_shapes_mask_token_and_bias():
  cfg = tiny_cfg()
  params = random_params(cfg)
  x, m = photos(), masks()
  embed = our_model(cfg).embed
  assert embed.num_extra_tokens == 1
  batch = {"image": jnp.asarray(x), "mask": jnp.asarray(m)}
  s, valid, bias = _fns(cfg)[2](params["embed"], batch, True)
  t, _, _ = _fns(cfg)[2](params["embed"], batch, False)
  s, t, bias = np.asarray(s), np.asarray(t), np.asarray(bias)
  assert s.shape == (2, 1 + GRID * GRID, 32) and valid is None and bias.shape == (1, 2, 17, 17)
  np.testing.assert_array_equal(s[:, 0], np.broadcast_to(params["embed"]["cls_token"], (2, 32)))
  np.testing.assert_array_equal(s[:, 1:][m], np.broadcast_to(params["embed"]["mask_token"], (m.sum(), 32)))
  np.testing.assert_array_equal(s[:, 1:][~m], t[:, 1:][~m])      # unmasked patches: the teacher's
  assert np.abs(s[:, 1:][m] - t[:, 1:][m]).min() > 0
  table = params["embed"]["rel_pos_bias"]
  idx = vision.relative_position_index(GRID, GRID)
  np.testing.assert_array_equal(bias[0, 1], table[idx, 1])
  # Patch p of the output is the projection of pixel block (p // G, p % G) (row-major).
  k, b0 = params["embed"]["patch"]["kernel"], params["embed"]["patch"]["bias"]
  p = 6
  block = x[0, (p // GRID) * PATCH:(p // GRID + 1) * PATCH, (p % GRID) * PATCH:(p % GRID + 1) * PATCH]
  np.testing.assert_allclose(t[0, 1 + p], np.einsum("hwc,hwcd->d", block, k) + b0, atol=1e-5)
  with pytest.raises(ValueError, match="expects"):
    embed.apply({"params": params["embed"]}, {"image": jnp.zeros((1, 16, 16, 3))}, student=False,
                deterministic=True)


# ----------------------------------------------------------------------- HF parity (import)


def test_import_from_hf_matches_pytorch(tmp_path):
  cfg = tiny_cfg()
  hf = hf_model(cfg)
  hf.save_pretrained(str(tmp_path))
  loaded = common.load(hf_vision, str(tmp_path), cfg)
  params = full_params(cfg, loaded)
  x, m = photos(), masks()
  for mask in (None, m):   # teacher view, then the student with the mask token (bool_masked_pos)
    ref_h, ref_last = run_hf(hf, x, mask)
    ours_h, ours_last = run_ours(cfg, params, x, mask)
    assert len(ours_h) == len(ref_h) == cfg.model.encoder.num_layers + 1
    for i, (a, b) in enumerate(zip(ours_h, ref_h)):   # embeddings, then end of every block
      assert max_abs(a, b) <= TOL, (mask is not None, i, max_abs(a, b))
    assert max_abs(ours_last, ref_last) <= TOL      # after the final LayerNorm
    assert np.abs(ref_last).max() > 0.5             # not a degenerate comparison
  # Unscanned storage (one subtree per layer) holds the same weights as the stacked one.
  flat = common.load(hf_vision, str(tmp_path), tiny_cfg(scan=False))
  assert sorted(flat["encoder"]) == ["final_norm", "layers_0", "layers_1"]
  for i, block in enumerate(common.layer_list(loaded["encoder"])):
    for k, v in flatten_dict(block).items():
      np.testing.assert_array_equal(flatten_dict(flat["encoder"][f"layers_{i}"]["block"])[k], v)


# ------------------------------------------------------------------------------- targets


def test_targets_hand_computed():
  """Top-K end-of-block choice, CLS dropped, per-layer LN, mean, final LN on a 3-layer case."""
  cfg = tiny_cfg(layers=3)
  layers = np.array([   # [L=3, B=1, T=3 (CLS + 2 patches), D=4]
      [[[9, 9, 9, 1], [1, 0, 0, 0], [0, 0, 0, 5]]],
      [[[7, 0, 0, 0], [1, 2, 3, 4], [2, 0, 2, 0]]],
      [[[5, 5, 0, 0], [4, 4, 0, 0], [0, 3, 0, 1]]],
  ], np.float32)
  n_extra = 1
  y = np.asarray(targets.targets_from_config(jnp.asarray(layers[:, :, n_extra:]), None, cfg.target))

  def ln(v):   # parameter-free LayerNorm, eps 1e-5 (F.layer_norm)
    v = np.asarray(v, np.float64)
    return (v - v.mean()) / np.sqrt(v.var() + 1e-5)

  # Patch 1: layers 2 and 3 (top K = 2) are [1,2,3,4] and [4,4,0,0].
  a = (np.array([-1.5, -0.5, 0.5, 1.5]) / np.sqrt(1.25 + 1e-5)
       + np.array([2, 2, -2, -2]) / np.sqrt(4 + 1e-5)) / 2
  # Patch 2: [2,0,2,0] and [0,3,0,1].
  b = (np.array([1, -1, 1, -1]) / np.sqrt(1 + 1e-5)
       + np.array([-1, 2, -1, 0]) / np.sqrt(1.5 + 1e-5)) / 2
  np.testing.assert_allclose(y[0, 0], ln(a), atol=1e-5)
  np.testing.assert_allclose(y[0, 1], ln(b), atol=1e-5)
  np.testing.assert_allclose(y[0, 0], ln((ln([1, 2, 3, 4]) + ln([4, 4, 0, 0])) / 2), atol=1e-5)
  assert y.shape == (1, 2, 4)


def test_teacher_targets_equal_hf_hidden_states(tmp_path):
  """The step's teacher targets == LN(mean(LN(hidden_states[-K:][:, 1:]))) of PyTorch HF."""
  cfg = tiny_cfg(layers=3)
  hf = hf_model(cfg, seed=3)
  hf.save_pretrained(str(tmp_path))
  params = full_params(cfg, common.load(hf_vision, str(tmp_path), cfg))
  teacher = ema.teacher_view(params, cfg.teacher.ema_subtrees)
  assert set(teacher) == {"embed", "encoder"}
  x, m = photos(), masks()
  model = our_model(cfg)
  fn = jax.jit(lambda p, t, b: step_lib.teacher_targets(model, p, t, b, cfg)[0])
  y = fn(params, teacher, {"image": jnp.asarray(x), "mask": jnp.asarray(m)})
  hidden, _ = run_hf(hf, x)

  def ln(v):
    v = v.astype(np.float64)
    return (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-5)

  expect = ln(np.mean([ln(h[:, 1:]) for h in hidden[-cfg.target.top_k:]], axis=0))
  assert np.asarray(y).shape == (2, GRID * GRID, 32)
  assert max_abs(y, expect) <= TOL


# ------------------------------------------------------------------------------- export


def test_export_loads_in_pytorch_and_flax(tmp_path):
  from transformers import FlaxBeitModel
  cfg = tiny_cfg()
  params = random_params(cfg, seed=5)
  out = str(tmp_path / "hf")
  common.export(hf_vision, params, cfg, out, str(tmp_path))
  assert {"config.json", "model.safetensors", "flax_model.msgpack", "preprocessor_config.json",
          "d2v_config.json"} <= set(os.listdir(out))

  pt, info = AutoModel.from_pretrained(out, output_loading_info=True)
  assert type(pt).__name__ == "Data2VecVisionModel"
  assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
  c = pt.config
  assert (c.use_shared_relative_position_bias, c.use_relative_position_bias, c.use_mean_pooling,
          c.use_mask_token, c.use_absolute_position_embeddings) == (True, False, False, True, False)
  assert (c.layer_norm_eps, c.image_size, c.patch_size, c.layer_scale_init_value) == (1e-6, 32, 8, 0.1)
  pt.eval()

  proc = AutoImageProcessor.from_pretrained(out)
  assert type(proc).__name__ == "BeitImageProcessor" and not proc.do_center_crop
  assert proc.size == {"height": IMAGE, "width": IMAGE}
  np.testing.assert_allclose(proc.image_mean, cfg.data.mean)
  np.testing.assert_allclose(proc.image_std, cfg.data.std)
  import skimage.data
  pix = proc(images=skimage.data.coffee(), return_tensors="np")["pixel_values"]
  assert pix.shape == (1, 3, IMAGE, IMAGE) and -2.2 < pix.min() < pix.max() < 2.7

  x, m = photos(), masks()
  errors = {}
  for mask in (None, m):
    ref_h, ref_last = run_hf(pt, x, mask)
    ours_h, ours_last = run_ours(cfg, params, x, mask)
    errors["pt_vs_ours" + ("_masked" if mask is not None else "")] = max(
        [max_abs(a, b) for a, b in zip(ours_h, ref_h)] + [max_abs(ours_last, ref_last)])
  ref_h, ref_last = run_hf(pt, x)

  fx = FlaxBeitModel.from_pretrained(out)
  fresh = FlaxBeitModel(fx.config, seed=1)
  got, want = flatten_dict(fx.params), flatten_dict(fresh.params)
  assert set(got) == set(want)                          # no missing / unexpected Flax weights
  assert all(got[k].shape == want[k].shape for k in want)
  fo = fx(pixel_values=np.transpose(x, (0, 3, 1, 2)), output_hidden_states=True)
  errors["flax_vs_pt"] = max([max_abs(a, b) for a, b in zip(fo.hidden_states, ref_h)]
                             + [max_abs(fo.last_hidden_state, ref_last)])
  fo = fx(pixel_values=np.transpose(x, (0, 3, 1, 2)), bool_masked_pos=m)
  errors["flax_vs_pt_masked"] = max_abs(fo.last_hidden_state, run_hf(pt, x, m)[1])

  assert all(e <= TOL for e in errors.values()), errors

  # Our load of our export gives back exactly the exported subtrees.
  back = common.load(hf_vision, out, cfg)
  fa, fb = flatten_dict(back), flatten_dict({k: params[k] for k in ("embed", "encoder")})
  assert set(fa) == set(fb)
  for k in fb:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=str(k))
  with open(os.path.join(out, "d2v_config.json")) as f:
    assert json.load(f)["modality"] == "vision"


# TensorFlow parity of the export (TFData2VecVision* classes): tests/test_hf_heads.py.


def test_load_errors_name_the_weight(tmp_path, capsys):
  cfg = tiny_cfg()
  hf = hf_model(cfg)
  state = torch_state(hf)
  with pytest.raises(ValueError, match=r"lacks 'encoder\.layer\.2\.attention\.attention\.query\.weight'"):
    common.from_hf_state(hf_vision, state, tiny_cfg(layers=3))
  with pytest.raises(ValueError, match=r"encoder\.layer\.1\.attention\.attention\.query\.weight' exists"):
    common.from_hf_state(hf_vision, state, tiny_cfg(layers=1))
  wide = tiny_cfg()
  wide.model.encoder.hidden = 48
  with pytest.raises(ValueError, match=r"'embeddings\.patch_embeddings\.projection\.weight' has shape"):
    common.from_hf_state(hf_vision, state, wide)
  with pytest.raises(ValueError, match="layer_scale"):
    common.from_hf_state(hf_vision, {k: v for k, v in state.items() if "lambda" not in k}, cfg)
  # Fine-tuned layout: per-layer tables, no shared one.
  per_layer = {k: v for k, v in state.items() if "relative_position_bias" not in k}
  per_layer["encoder.layer.0.attention.attention.relative_position_bias.relative_position_bias_table"] = \
      state[hf_vision.REL_TABLE]
  with pytest.raises(ValueError, match="per-layer relative position"):
    common.from_hf_state(hf_vision, per_layer, cfg)
  # BEiT-prefixed names load; a missing mask token (official conversions) is created.
  prefixed = {"beit." + k: v for k, v in state.items() if k != "embeddings.mask_token"}
  prefixed["lm_head.weight"] = np.zeros((8, 32), np.float32)
  params = common.from_hf_state(hf_vision, prefixed, cfg)
  assert "no embeddings.mask_token" in capsys.readouterr().err
  new_token = params["embed"]["mask_token"]
  assert new_token.shape == (32,) and 0 < np.abs(new_token).max() <= 0.04
  np.testing.assert_array_equal(params["embed"]["cls_token"], state["embeddings.cls_token"].reshape(-1))
  post_ln = tiny_cfg()
  post_ln.model.encoder.pre_ln = False
  with pytest.raises(config_lib.ConfigError, match="pre_ln=False"):
    hf_vision.hf_config(post_ln)


def test_weight_decay_mask_follows_beit():
  """configs/vision.py optim.no_decay / optim.decay as data2vec_vision's optim_factory: decay
  >= 2-D weights, the mask token and the relative position table; never biases, norms, layer
  scales or the CLS token (scanned params included)."""
  from d2v_jax import optim
  cfg = tiny_cfg()
  params = random_params(cfg)
  decay = flatten_dict(optim.decay_mask(cfg.optim)(params))
  on = sorted("/".join(k) for k, v in decay.items() if v)
  assert on == ["embed/mask_token", "embed/patch/kernel", "embed/rel_pos_bias",
                "encoder/layers/block/attention/key/kernel",
                "encoder/layers/block/attention/out/kernel", "encoder/layers/block/attention/query/kernel",
                "encoder/layers/block/attention/value/kernel", "encoder/layers/block/fc1/kernel",
                "encoder/layers/block/fc2/kernel", "head/out/kernel"]
  assert cfg.optim.weight_decay == 0.05 and not cfg.optim.decay_1d
