"""data2vec-vision <-> Hugging Face `Data2VecVisionModel` / `FlaxBeitModel` (docs/algorithm.md
§5.2, §5.4). Our BEiT encoder maps one-to-one onto the pretraining layout of the official
conversion (shared relative position bias, final LayerNorm, no mean pooling), plus the mask
token; the walk is d2v_jax/hf/common.py. `params['head']` (the regression head, DV's lm_head)
is a pretraining module and is not exported, as in the official conversion.
"""

from __future__ import annotations

import numpy as np

from d2v_jax.hf import common
from d2v_jax.hf.common import Table

FAMILY = "Data2VecVision/BEiT"
FAMILIES = ("data2vec-vision", "beit")        # config.json model_type values we import
ARCHITECTURE = "Data2VecVisionModel"
FLAX = True                                   # FlaxBeitModel reads the export
ARCH = common.ENCODER_ARCH + (("image_size", "model.image_size"), ("patch_size", "model.patch_size"),
                              ("num_channels", "model.channels"),
                              ("layer_scale_init_value", "model.encoder.layer_scale"))
PREFIXES = ("data2vec_vision.", "beit.", "")  # task heads' prefixes, then the bare base model
# What to check when a weight is missing or misshapen (the config keys behind the shapes).
HINT = "model.image_size / patch_size and the model.encoder sizes / layer_scale"
PROBE = "embeddings.patch_embeddings.projection.weight"
REL_TABLE = "encoder.relative_position_bias.relative_position_bias_table"


def table(cfg) -> Table:
  block = (("attention.attention.query", ("attention", "query"), "dense"),
           ("attention.attention.key", ("attention", "key"), "dense_nobias"),
           ("attention.attention.value", ("attention", "value"), "dense"),
           ("attention.output.dense", ("attention", "out"), "dense"),
           ("layernorm_before", ("attn_norm",), "norm"),
           ("layernorm_after", ("mlp_norm",), "norm"),
           ("intermediate.dense", ("fc1",), "dense"),
           ("output.dense", ("fc2",), "dense"))
  if cfg.model.encoder.layer_scale > 0:
    block += (("lambda_1", ("lambda_1",), "param"), ("lambda_2", ("lambda_2",), "param"))
  return Table(
      top=(("embeddings.patch_embeddings.projection", ("embed", "patch"), "conv2d"),
           ("embeddings.cls_token", ("embed", "cls_token"), "token"),
           ("embeddings.mask_token", ("embed", "mask_token"), "token"),
           (REL_TABLE, ("embed", "rel_pos_bias"), "param"),
           ("layernorm", ("encoder", "final_norm"), "norm")),
      block=block, layer_prefix="encoder.layer.{i}")


def remote_map(cfg) -> str | None:
  """The module of the map that holds cfg's model when this one cannot: remote code for
  fairseq's data2vec 2.0 ViT (sin-cos positions, no relative bias: vision_vit.py, which builds
  on this map; named, not imported, to keep the import graph acyclic)."""
  return "d2v_jax.hf.vision_vit" if cfg.model.pos_embed == "sincos" and not cfg.model.rel_pos_bias else None


def check_representable(cfg) -> None:
  enc = cfg.model.encoder
  common.check_representable(cfg, [
      (not enc.pre_ln, "model.encoder.pre_ln=False"), (enc.key_bias, "model.encoder.key_bias=True"),
      (enc.input_norm, "model.encoder.input_norm=True"),
      (not enc.final_norm, "model.encoder.final_norm=False"),
      (not cfg.model.rel_pos_bias, "model.rel_pos_bias=False"),
      (cfg.model.pos_embed != "none", f"model.pos_embed={cfg.model.pos_embed!r}")],
      "Data2VecVision/BEiT", "pre-LN, no k-bias, final LayerNorm", "configs/vision.py encoder")


def out_indices(num_layers: int) -> list[int]:
  """HF's default [3, 5, 7, 11] for 12 layers, scaled to the depth (FlaxBeit checks them)."""
  return sorted({max(0, round(num_layers * k / 12) - 1) for k in (4, 6, 8, 12)})


def hf_config(cfg):
  """transformers.Data2VecVisionConfig of the pretraining layout (official conversion + mask token)."""
  # transformers (seconds of import) only where an HF object is made
  from transformers import Data2VecVisionConfig
  check_representable(cfg)
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
  # (transformers: see hf_config)
  from transformers import BeitImageProcessor
  from transformers.image_utils import PILImageResampling
  s = cfg.model.image_size
  return BeitImageProcessor(
      do_resize=True, size={"height": s, "width": s}, resample=PILImageResampling.BICUBIC,
      do_center_crop=False, crop_size={"height": s, "width": s}, do_rescale=True,
      rescale_factor=1 / 255, do_normalize=True, image_mean=list(cfg.data.mean),
      image_std=list(cfg.data.std), do_reduce_labels=False)


def complete(state: dict, cfg) -> dict:
  """Before the shape check of an import. A checkpoint without a mask token (the official
  conversions drop it) gets a fresh one (trunc-normal 0.02, seeded by cfg.seed), with a
  warning. Per-layer relative position tables or absolute position embeddings (fine-tuned
  layouts) have no place in our model and raise ValueError."""
  if "embeddings.position_embeddings" in state:
    raise ValueError("HF weight 'embeddings.position_embeddings' (absolute positions) has no place "
                     "in our model (shared relative position bias only); use a checkpoint of the "
                     "pretraining layout")
  if REL_TABLE not in state and any("attention.relative_position_bias" in k for k in state):
    raise ValueError(f"HF checkpoint has per-layer relative position tables but no shared {REL_TABLE!r}"
                     " (a fine-tuned layout); our model needs the pretraining layout")
  if "embeddings.mask_token" not in state:
    rng = np.random.default_rng(int(cfg.seed))
    d = cfg.model.encoder.hidden
    state["embeddings.mask_token"] = np.clip(rng.normal(0, 0.02, (1, 1, d)), -0.04, 0.04)
    common.warn("HF checkpoint has no embeddings.mask_token (use_mask_token=False); initialised "
                "a new one")
  return state


def write_extra(cfg, out_dir: str, workdir: str):
  """preprocessor_config.json (BeitImageProcessor: resize to image_size, no centre crop, our
  mean / std) and the HF config. `AutoModel` / `AutoImageProcessor.from_pretrained(out_dir)`
  give Data2VecVisionModel / BeitImageProcessor; `FlaxBeitModel.from_pretrained(out_dir)`
  reads the msgpack (model-type warning only); `TFData2VecVisionModel.from_pretrained(out_dir,
  from_pt=True)` the safetensors."""
  del workdir  # nothing data-dependent to copy (no tokenizer)
  image_processor(cfg).save_pretrained(out_dir)
  return hf_config(cfg)
