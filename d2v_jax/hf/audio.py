"""data2vec-audio <-> Hugging Face `Data2VecAudioModel` (docs/algorithm.md §5.3, §5.4).

No Hugging Face Flax class can hold this architecture: `FlaxWav2Vec2Model` only supports the
pre-LN encoder (`do_stable_layer_norm=True`, raises NotImplementedError otherwise) with a single
weight-normed positional conv, and transformers has no Flax Data2VecAudio. data2vec-audio is
post-LN with a 5-layer grouped positional conv, so the export is PyTorch only
(`Data2VecAudioModel`, `Data2VecAudioForCTC`, ... load it), and our own Flax model
(d2v_jax/models/audio.py + the shared encoder) is the Flax implementation: `load` reads any HF
Data2VecAudio checkpoint into our parameter tree. The walk is d2v_jax/hf/common.py.

`params['head']` (the regression head) is a pretraining module and is not exported, as in the
fairseq -> HF conversion. `masked_spec_embed` exists in HF iff mask_time_prob > 0; we export
our learned mask embedding there with mask_time_prob = 0.05 (HF's fine-tuning SpecAugment
default; the pretraining masking lives in our data pipeline, not in the HF config).
"""

from __future__ import annotations

import numpy as np

from d2v_jax.hf import common
from d2v_jax.hf.common import Table

FAMILY = "Data2VecAudio"
FAMILIES = ("data2vec-audio",)                # config.json model_type values we import
ARCHITECTURE = "Data2VecAudioModel"
FLAX = False                                  # no HF Flax class holds it (module doc)
ARCH = common.ENCODER_ARCH + (("conv_dim", "model.conv_dims"), ("conv_stride", "model.conv_strides"),
                              ("conv_kernel", "model.conv_kernels"), ("conv_bias", "model.conv_bias"),
                              ("num_conv_pos_embeddings", "model.pos_conv_depth"),
                              ("conv_pos_kernel_size", "model.pos_conv_kernel"),
                              ("num_conv_pos_embedding_groups", "model.pos_conv_groups"))
PREFIXES = ("data2vec_audio.", "")            # Data2VecAudioFor* heads, base model
# What to check when a weight is missing or misshapen (the config keys behind the shapes).
HINT = "model.conv_dims / conv_kernels / conv_bias / pos_conv_* and the model.encoder sizes"
PROBE = "feature_projection.projection.weight"


def table(cfg) -> Table:
  m = cfg.model
  conv = "conv1d" if m.conv_bias else "conv1d_nobias"
  top = []
  for i in range(len(m.conv_dims)):
    top += [(f"feature_extractor.conv_layers.{i}.conv", ("embed", f"conv_layers_{i}", "conv"), conv),
            (f"feature_extractor.conv_layers.{i}.layer_norm", ("embed", f"conv_layers_{i}", "layer_norm"),
             "norm")]
  top += [("feature_projection.layer_norm", ("embed", "feature_norm"), "norm"),
          ("feature_projection.projection", ("embed", "projection"), "dense"),
          ("masked_spec_embed", ("embed", "mask_emb"), "param")]
  top += [(f"encoder.pos_conv_embed.layers.{i}.conv", ("embed", f"pos_conv_{i}"), "conv1d")
          for i in range(m.pos_conv_depth)]
  top.append(("encoder.layer_norm", ("encoder", "input_norm"), "norm"))
  return Table(
      top=tuple(top),
      block=(("attention.q_proj", ("attention", "query"), "dense"),
             ("attention.k_proj", ("attention", "key"), "dense"),
             ("attention.v_proj", ("attention", "value"), "dense"),
             ("attention.out_proj", ("attention", "out"), "dense"),
             ("layer_norm", ("attn_norm",), "norm"),
             ("feed_forward.intermediate_dense", ("fc1",), "dense"),
             ("feed_forward.output_dense", ("fc2",), "dense"),
             ("final_layer_norm", ("mlp_norm",), "norm")),
      layer_prefix="encoder.layers.{i}")


def remote_map(cfg) -> str | None:
  """The module of the map that holds cfg's model when this one cannot: remote code for
  ALiBi (audio_alibi.py, which builds on this map; named, not imported, to keep the import
  graph acyclic)."""
  return "d2v_jax.hf.audio_alibi" if cfg.model.alibi else None


def check_representable(cfg, alibi_ok: bool = False) -> None:
  m, enc = cfg.model, cfg.model.encoder
  common.check_representable(cfg, [
      (m.conv_norm != "layer", f"model.conv_norm={m.conv_norm!r} (HF: LayerNorm in every conv layer)"),
      (m.pos_conv != "data2vec", f"model.pos_conv={m.pos_conv!r} (HF: the 5-layer data2vec pos conv)"),
      (enc.pre_ln, "model.encoder.pre_ln=True"), (enc.layer_scale > 0, "model.encoder.layer_scale>0"),
      (not enc.key_bias, "model.encoder.key_bias=False"), (not enc.input_norm, "model.encoder.input_norm=False"),
      (enc.final_norm, "model.encoder.final_norm=True"),
      (m.alibi and not alibi_ok, "model.alibi=True (ALiBi)")],
      "Data2VecAudio", "post-LN, LayerNorm conv extractor, data2vec pos conv, encoder input "
      "LayerNorm", "configs/audio.py model")


def hf_config(cfg, alibi_ok: bool = False):
  """transformers.Data2VecAudioConfig for our audio model."""
  # transformers (seconds of import) only where an HF object is made
  from transformers import Data2VecAudioConfig
  check_representable(cfg, alibi_ok)
  m, enc = cfg.model, cfg.model.encoder
  return Data2VecAudioConfig(
      hidden_size=enc.hidden, num_hidden_layers=enc.num_layers, num_attention_heads=enc.heads,
      intermediate_size=enc.mlp_dim, hidden_act="gelu", feat_extract_activation="gelu",
      hidden_dropout=enc.dropout, activation_dropout=enc.activation_dropout,
      attention_dropout=enc.attention_dropout, feat_proj_dropout=m.feature_dropout,
      layerdrop=enc.layerdrop, layer_norm_eps=enc.layer_norm_eps, initializer_range=0.02,
      conv_dim=tuple(int(c) for c in m.conv_dims), conv_stride=tuple(int(s) for s in m.conv_strides),
      conv_kernel=tuple(int(k) for k in m.conv_kernels), conv_bias=bool(m.conv_bias),
      num_conv_pos_embeddings=int(m.pos_conv_depth), conv_pos_kernel_size=int(m.pos_conv_kernel),
      num_conv_pos_embedding_groups=int(m.pos_conv_groups),
      mask_time_prob=0.05, mask_time_length=int(cfg.data.span), mask_time_min_masks=2)


def complete(state: dict, cfg) -> dict:
  """Before the shape check of an import: without `masked_spec_embed` (checkpoints saved with
  mask_time_prob = 0) the mask embedding is initialised like ours, U[0, 1) seeded by cfg.seed."""
  if "masked_spec_embed" not in state:
    d = cfg.model.encoder.hidden
    state["masked_spec_embed"] = np.random.default_rng(int(cfg.seed)).uniform(0, 1, (d,)).astype(np.float32)
  return state


def feature_extractor(cfg):
  """Wav2Vec2FeatureExtractor matching our input: mono, cfg rate, per-utterance normalisation
  (do_normalize) and an attention mask (the padding is masked out, as in our batches)."""
  # (transformers: see hf_config)
  from transformers import Wav2Vec2FeatureExtractor
  return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=int(cfg.data.sample_rate),
                                  padding_value=0.0, do_normalize=bool(cfg.data.normalize),
                                  return_attention_mask=True)


def write_extra(cfg, out_dir: str, workdir: str):
  """preprocessor_config.json (Wav2Vec2FeatureExtractor: AutoFeatureExtractor loads it) and
  the HF config. No Flax weights: see the module docstring."""
  del workdir  # nothing data-derived to copy (no tokenizer)
  feature_extractor(cfg).save_pretrained(out_dir)
  return hf_config(cfg)
