"""fairseq data2vec 2.0's ViT (model.pos_embed="sincos", no relative bias, post-LN, input
LayerNorm) -> a Hugging Face directory with remote code.

No transformers class holds this ViT (BEiT / ViT are pre-LN), so the export carries
modeling_d2v_vision_vit.py (d2v_jax/hf/remote/): patch embedding + fixed sin-cos positions,
CLS, a LayerNorm on [CLS; patches], then BERT's post-LN layers. config.json's auto_map makes
AutoModel load it with trust_remote_code=True; the image processor is the BEiT map's.
"""

from __future__ import annotations

from d2v_jax.hf import common, vision
from d2v_jax.hf.common import Table
from d2v_jax.hf.text import table as bert_table

FAMILY = "data2vec 2.0 ViT (remote code)"
FAMILIES = ("data2vec2-vision",)
ARCHITECTURE = "Data2Vec2VisionModel"
FLAX = False
ARCH = common.ENCODER_ARCH
PREFIXES = ("data2vec2_vision.", "")
HINT = vision.HINT
PROBE = "embeddings.patch_embeddings.projection.weight"
REMOTE = ("modeling_d2v_vision_vit.py", "data2vec2-vision",
          {"AutoConfig": "Data2Vec2VisionConfig", "AutoModel": "Data2Vec2VisionModel"})


def table(cfg) -> Table:
  return Table(top=(("embeddings.patch_embeddings.projection", ("embed", "patch"), "conv2d"),
                    ("embeddings.cls_token", ("embed", "cls_token"), "token"),
                    ("embeddings.layer_norm", ("encoder", "input_norm"), "norm")),
               block=bert_table(cfg).block, layer_prefix="encoder.layer.{i}")


def check_representable(cfg) -> None:
  m, enc = cfg.model, cfg.model.encoder
  common.check_representable(cfg, [
      (enc.pre_ln, "model.encoder.pre_ln=True"), (enc.layer_scale > 0, "model.encoder.layer_scale>0"),
      (not enc.key_bias, "model.encoder.key_bias=False"), (not enc.input_norm, "model.encoder.input_norm=False"),
      (enc.final_norm, "model.encoder.final_norm=True"), (m.rel_pos_bias, "model.rel_pos_bias=True"),
      (m.pos_embed != "sincos", f"model.pos_embed={m.pos_embed!r}")],
      FAMILY, "post-LN, sin-cos positions, input LayerNorm", "fairseq data2vec 2.0 ViT")


def hf_config(cfg):
  """The remote Data2Vec2VisionConfig's fields on a BertConfig (BertEncoder reads them); the
  export rewrites model_type and adds auto_map (common.export)."""
  # transformers (seconds of import) only where an HF object is made
  from transformers import BertConfig
  check_representable(cfg)
  m, enc = cfg.model, cfg.model.encoder
  return BertConfig(hidden_size=enc.hidden, num_hidden_layers=enc.num_layers,
                    num_attention_heads=enc.heads, intermediate_size=enc.mlp_dim, hidden_act="gelu",
                    hidden_dropout_prob=enc.dropout, attention_probs_dropout_prob=enc.attention_dropout,
                    layer_norm_eps=enc.layer_norm_eps, image_size=m.image_size,
                    patch_size=m.patch_size, num_channels=m.channels, initializer_range=0.02)


def write_extra(cfg, out_dir: str, workdir: str):
  del workdir
  vision.image_processor(cfg).save_pretrained(out_dir)
  return hf_config(cfg)
