"""data2vec-vision <-> Hugging Face `Data2VecVisionModel` / `FlaxBeitModel` (ALGORITHM.md §5.2, §5.4).

Our BEiT encoder maps one-to-one onto the pretraining layout of the official conversion
(shared relative position bias, final LayerNorm, no mean pooling), plus the mask token:

  embed/patch/{kernel (p,p,C,D), bias}   embeddings.patch_embeddings.projection.{weight [D,C,p,p], bias}
  embed/cls_token, embed/mask_token [D]  embeddings.cls_token, embeddings.mask_token [1,1,D]
  embed/rel_pos_bias [R, heads]          encoder.relative_position_bias.relative_position_bias_table
  block/attention/{query,key,value,out}  encoder.layer.i.attention.attention.{query,key,value},
                                         encoder.layer.i.attention.output.dense (key: no bias)
  block/attn_norm, block/mlp_norm        encoder.layer.i.layernorm_before, .layernorm_after
  block/fc1, block/fc2                   encoder.layer.i.intermediate.dense, .output.dense
  block/lambda_1, block/lambda_2         encoder.layer.i.lambda_1, .lambda_2 (layer scale)
  encoder/final_norm                     layernorm

Dense kernels are (in, out) = torch weight.T. `params['head']` (the regression head, DV's
lm_head) is a pretraining module and is not exported, as in the official conversion.
"""

from __future__ import annotations

import os
import sys

import flax
import numpy as np

from d2v_jax import config as config_lib
from d2v_jax.hf import common

FAMILIES = ("data2vec-vision", "beit")        # config.json model_type values we import
ARCH = common.ENCODER_ARCH + (("image_size", "model.image_size"), ("patch_size", "model.patch_size"),
                              ("num_channels", "model.channels"),
                              ("layer_scale_init_value", "model.encoder.layer_scale"))
PREFIXES = ("data2vec_vision.", "beit.", "")  # task heads' prefixes, then the bare base model
PROBE = "embeddings.patch_embeddings.projection.weight"
REL_TABLE = "encoder.relative_position_bias.relative_position_bias_table"

# (HF module name, our path inside a block, kind); kind picks the leaf names.
BLOCK_MAP = (
    ("attention.attention.query", ("attention", "query"), "dense"),
    ("attention.attention.key", ("attention", "key"), "dense_nobias"),
    ("attention.attention.value", ("attention", "value"), "dense"),
    ("attention.output.dense", ("attention", "out"), "dense"),
    ("layernorm_before", ("attn_norm",), "norm"),
    ("layernorm_after", ("mlp_norm",), "norm"),
    ("intermediate.dense", ("fc1",), "dense"),
    ("output.dense", ("fc2",), "dense"),
)
LAYER_SCALE = (("lambda_1", "lambda_1"), ("lambda_2", "lambda_2"))
# (torch suffix, flax leaf, transpose)
LEAVES = {
    "dense": (("weight", "kernel", True), ("bias", "bias", False)),
    "dense_nobias": (("weight", "kernel", True),),
    "norm": (("weight", "scale", False), ("bias", "bias", False)),
}


def _check_representable(cfg) -> None:
  enc = cfg.model.encoder
  bad = [(not enc.pre_ln, "model.encoder.pre_ln=False"), (enc.key_bias, "model.encoder.key_bias=True"),
         (enc.input_norm, "model.encoder.input_norm=True"),
         (not enc.final_norm, "model.encoder.final_norm=False")]
  for is_bad, what in bad:
    if is_bad:
      raise config_lib.ConfigError(
          f"{what} has no Data2VecVision/BEiT equivalent (pre-LN, no k-bias, final LayerNorm); "
          "use the configs/vision.py encoder settings to export to Hugging Face")


def out_indices(num_layers: int) -> list[int]:
  """HF's default [3, 5, 7, 11] for 12 layers, scaled to the depth (FlaxBeit checks them)."""
  return sorted({max(0, round(num_layers * k / 12) - 1) for k in (4, 6, 8, 12)})


def hf_config(cfg):
  """transformers.Data2VecVisionConfig of the pretraining layout (official conversion + mask token)."""
  from transformers import Data2VecVisionConfig
  _check_representable(cfg)
  m, enc = cfg.model, cfg.model.encoder
  return Data2VecVisionConfig(
      hidden_size=enc.hidden, num_hidden_layers=enc.num_layers, num_attention_heads=enc.heads,
      intermediate_size=enc.mlp_dim, hidden_act="gelu", hidden_dropout_prob=enc.dropout,
      attention_probs_dropout_prob=enc.attention_dropout, initializer_range=0.02,
      layer_norm_eps=enc.layer_norm_eps, image_size=m.image_size, patch_size=m.patch_size,
      num_channels=m.channels, use_mask_token=True, use_absolute_position_embeddings=False,
      use_relative_position_bias=False, use_shared_relative_position_bias=True,
      layer_scale_init_value=float(max(enc.layer_scale, 0.0)), drop_path_rate=enc.drop_path,
      use_mean_pooling=False, out_indices=out_indices(enc.num_layers))


def image_processor(cfg):
  """BeitImageProcessor: resize to image_size (bicubic), no centre crop, our mean / std."""
  from transformers import BeitImageProcessor
  from transformers.image_utils import PILImageResampling
  s = cfg.model.image_size
  return BeitImageProcessor(
      do_resize=True, size={"height": s, "width": s}, resample=PILImageResampling.BICUBIC,
      do_center_crop=False, crop_size={"height": s, "width": s}, do_rescale=True,
      rescale_factor=1 / 255, do_normalize=True, image_mean=list(cfg.data.mean),
      image_std=list(cfg.data.std), do_reduce_labels=False)


_get, _put = common.get_path, common.put_path


def _f32(x) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def to_hf_state(params, cfg) -> dict[str, np.ndarray]:
  """Our params (scanned or not, boxed or not) -> bare Data2VecVisionModel state dict."""
  _check_representable(cfg)
  params = common.unbox(params)
  emb, enc = params["embed"], params["encoder"]
  d = cfg.model.encoder.hidden
  out = {
      PROBE: _f32(emb["patch"]["kernel"]).transpose(3, 2, 0, 1),
      "embeddings.patch_embeddings.projection.bias": _f32(emb["patch"]["bias"]),
      "embeddings.cls_token": _f32(emb["cls_token"]).reshape(1, 1, d),
      "embeddings.mask_token": _f32(emb["mask_token"]).reshape(1, 1, d),
      REL_TABLE: _f32(emb["rel_pos_bias"]),
      "layernorm.weight": _f32(enc["final_norm"]["scale"]),
      "layernorm.bias": _f32(enc["final_norm"]["bias"]),
  }
  for i, block in enumerate(common.layer_list(enc)):
    for hf_name, path, kind in BLOCK_MAP:
      sub = _get(block, path)
      for suffix, leaf, transpose in LEAVES[kind]:
        x = _f32(sub[leaf])
        out[f"encoder.layer.{i}.{hf_name}.{suffix}"] = x.T.copy() if transpose else x
    if cfg.model.encoder.layer_scale > 0:
      for hf_name, leaf in LAYER_SCALE:
        out[f"encoder.layer.{i}.{hf_name}"] = _f32(block[leaf])
  return out


def expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
  """Torch names and shapes of the base-model weights our model needs."""
  m, enc = cfg.model, cfg.model.encoder
  d, f, p, g = enc.hidden, enc.mlp_dim, m.patch_size, m.image_size // m.patch_size
  out = {PROBE: (d, m.channels, p, p), "embeddings.patch_embeddings.projection.bias": (d,),
         "embeddings.cls_token": (1, 1, d), "embeddings.mask_token": (1, 1, d),
         REL_TABLE: ((2 * g - 1) ** 2 + 3, enc.heads), "layernorm.weight": (d,), "layernorm.bias": (d,)}
  dense = {"attention.attention.query": (d, d), "attention.attention.key": (d, d),
           "attention.attention.value": (d, d), "attention.output.dense": (d, d),
           "intermediate.dense": (f, d), "output.dense": (d, f)}
  for i in range(enc.num_layers):
    for hf_name, _, kind in BLOCK_MAP:
      name = f"encoder.layer.{i}.{hf_name}"
      if kind == "norm":
        out[f"{name}.weight"] = out[f"{name}.bias"] = (d,)
      else:
        out[f"{name}.weight"] = dense[hf_name]
        if kind == "dense":
          out[f"{name}.bias"] = (dense[hf_name][0],)
    if enc.layer_scale > 0:
      for hf_name, _ in LAYER_SCALE:
        out[f"encoder.layer.{i}.{hf_name}"] = (d,)
  return out


def _strip_prefix(state: dict) -> dict:
  return common.strip_prefix(state, PROBE, PREFIXES, "Data2VecVision/BEiT")


def from_hf_state(state: dict, cfg, seed: int = 0) -> dict:
  """Data2VecVision / BEiT state dict (prefixed or bare) -> {'embed', 'encoder'} in our layout.

  A checkpoint without a mask token (the official conversions drop it) gets a fresh one
  (trunc-normal 0.02, seeded), with a warning. Per-layer relative position tables or
  absolute position embeddings (fine-tuned layouts) have no place in our model and raise.
  A missing weight, or one whose shape disagrees with cfg, raises ValueError naming the first.
  """
  _check_representable(cfg)
  state = _strip_prefix(state)
  enc = cfg.model.encoder
  if "embeddings.position_embeddings" in state:
    raise ValueError("HF weight 'embeddings.position_embeddings' (absolute positions) has no place "
                     "in our model (shared relative position bias only); use a checkpoint of the "
                     "pretraining layout")
  if REL_TABLE not in state and any("attention.relative_position_bias" in k for k in state):
    raise ValueError(f"HF checkpoint has per-layer relative position tables but no shared {REL_TABLE!r}"
                     " (a fine-tuned layout); our model needs the pretraining layout")
  if f"encoder.layer.{enc.num_layers}.layernorm_before.weight" in state:
    raise ValueError(f"HF weight 'encoder.layer.{enc.num_layers}.layernorm_before.weight' exists: the "
                     f"checkpoint is deeper than model.encoder.num_layers={enc.num_layers}")
  state = dict(state)
  if "embeddings.mask_token" not in state:
    rng = np.random.default_rng(seed)
    state["embeddings.mask_token"] = np.clip(rng.normal(0, 0.02, (1, 1, enc.hidden)), -0.04, 0.04)
    print("warning: HF checkpoint has no embeddings.mask_token (use_mask_token=False); "
          "initialised a new one", file=sys.stderr)
  for name, want in expected_shapes(cfg).items():
    if name not in state:
      raise ValueError(f"HF state dict lacks {name!r} (expected shape {want}); it does not match "
                       "model.encoder (num_layers / layer_scale) or is not a BEiT encoder")
    got = tuple(np.shape(state[name]))
    if got != want:
      raise ValueError(f"HF weight {name!r} has shape {got} but the config expects {want} "
                       "(check model.image_size / patch_size / encoder sizes)")
  embed = {
      "patch": {"kernel": _f32(state[PROBE]).transpose(2, 3, 1, 0),
                "bias": _f32(state["embeddings.patch_embeddings.projection.bias"])},
      "cls_token": _f32(state["embeddings.cls_token"]).reshape(-1),
      "mask_token": _f32(state["embeddings.mask_token"]).reshape(-1),
      "rel_pos_bias": _f32(state[REL_TABLE]),
  }
  layers = []
  for i in range(enc.num_layers):
    block: dict = {}
    for hf_name, path, kind in BLOCK_MAP:
      sub = {}
      for suffix, leaf, transpose in LEAVES[kind]:
        x = _f32(state[f"encoder.layer.{i}.{hf_name}.{suffix}"])
        sub[leaf] = x.T.copy() if transpose else x
      _put(block, path, sub)
    if enc.layer_scale > 0:
      for hf_name, leaf in LAYER_SCALE:
        block[leaf] = _f32(state[f"encoder.layer.{i}.{hf_name}"])
    layers.append(block)
  encoder = common.set_layers({}, layers, enc.scan)
  encoder["final_norm"] = {"scale": _f32(state["layernorm.weight"]), "bias": _f32(state["layernorm.bias"])}
  return {"embed": embed, "encoder": encoder}


def flax_beit_params(state: dict[str, np.ndarray]) -> dict:
  """Bare Data2VecVision state dict -> FlaxBeitModel param tree (same dotted names, Flax leaves)."""
  tree: dict = {}
  for name, x in state.items():
    *path, suffix = name.split(".")
    x = _f32(x)
    if name == PROBE:
      leaf, x = "kernel", x.transpose(2, 3, 1, 0)   # OIHW -> HWIO
    elif suffix in ("cls_token", "mask_token", "lambda_1", "lambda_2",
                    "relative_position_bias_table"):
      path, leaf = path + [suffix], None
    elif path[-1].startswith("layernorm"):
      leaf = "scale" if suffix == "weight" else "bias"
    elif suffix == "weight":
      leaf, x = "kernel", x.T
    else:
      leaf = "bias"
    _put(tree, tuple(path) + ((leaf,) if leaf else ()), np.ascontiguousarray(x))
  return tree


def export(params, cfg, out_dir: str, workdir: str) -> None:
  """Writes a Hugging Face directory for our vision model.

  out_dir/: config.json (Data2VecVisionConfig, architectures ["Data2VecVisionModel"]: shared
  relative position bias, mask token, layer scale, final LayerNorm), model.safetensors
  (PyTorch names, float32), preprocessor_config.json (BeitImageProcessor: resize to
  image_size, no centre crop, our mean / std), flax_model.msgpack (the same weights as a
  FlaxBeitModel tree) and d2v_config.json (the resolved training config).
  `AutoModel` / `AutoImageProcessor.from_pretrained(out_dir)` give Data2VecVisionModel /
  BeitImageProcessor; `FlaxBeitModel.from_pretrained(out_dir)` reads the msgpack (model-type
  warning only); `TFData2VecVisionModel.from_pretrained(out_dir, from_pt=True)` the safetensors.
  """
  del workdir  # nothing data-dependent to copy (no tokenizer)
  os.makedirs(out_dir, exist_ok=True)
  hf_cfg = hf_config(cfg)
  hf_cfg.architectures = ["Data2VecVisionModel"]
  state = to_hf_state(params, cfg)
  hf_cfg.save_pretrained(out_dir)
  image_processor(cfg).save_pretrained(out_dir)
  common.save_state_dict(state, out_dir)
  with open(os.path.join(out_dir, "flax_model.msgpack"), "wb") as f:
    f.write(flax.serialization.msgpack_serialize(flax_beit_params(state)))
  common.write_json(config_lib.to_dict(cfg), os.path.join(out_dir, "d2v_config.json"))


def load(path: str, cfg) -> dict:
  """HF directory (model.safetensors or pytorch_model.bin) -> {'embed', 'encoder'} params."""
  return from_hf_state(common.load_state_dict(path), cfg, seed=int(cfg.seed))
