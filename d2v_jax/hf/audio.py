"""data2vec-audio <-> Hugging Face `Data2VecAudioModel` (ALGORITHM.md §5.3, §5.4).

No Hugging Face Flax class can hold this architecture: `FlaxWav2Vec2Model` only supports the
pre-LN encoder (`do_stable_layer_norm=True`, raises NotImplementedError otherwise) with a single
weight-normed positional conv, and transformers has no Flax Data2VecAudio. data2vec-audio is
post-LN with a 5-layer grouped positional conv, so the export is PyTorch only
(`Data2VecAudioModel`, `Data2VecAudioForCTC`, ... load it), and our own Flax model
(d2v_jax/models/audio.py + the shared encoder) is the Flax implementation: `load` reads any HF
Data2VecAudio checkpoint into our parameter tree.

Map (ours -> HF; Dense kernels are torch weight.T, conv kernels (k, in/groups, out) are torch
(out, in/groups, k) transposed):

  embed/conv_layers_i/conv/{kernel,bias}       feature_extractor.conv_layers.i.conv.{weight,bias}
  embed/conv_layers_i/layer_norm/{scale,bias}  feature_extractor.conv_layers.i.layer_norm
  embed/feature_norm                           feature_projection.layer_norm
  embed/projection                             feature_projection.projection
  embed/mask_emb                               masked_spec_embed
  embed/pos_conv_i/{kernel,bias}               encoder.pos_conv_embed.layers.i.conv
  encoder/input_norm                           encoder.layer_norm
  block/attention/{query,key,value,out}        encoder.layers.i.attention.{q,k,v,out}_proj
  block/attn_norm                              encoder.layers.i.layer_norm
  block/fc1, block/fc2                         encoder.layers.i.feed_forward.{intermediate,output}_dense
  block/mlp_norm                               encoder.layers.i.final_layer_norm

`params['head']` (the regression head) is a pretraining module and is not exported, as in the
fairseq -> HF conversion. `masked_spec_embed` exists in HF iff mask_time_prob > 0; we export
our learned mask embedding there with mask_time_prob = 0.05 (HF's fine-tuning SpecAugment
default; the pretraining masking lives in our data pipeline, not in the HF config).
"""

from __future__ import annotations

import os

import numpy as np

from d2v_jax import config as config_lib
from d2v_jax.hf import common

FAMILIES = ("data2vec-audio",)                # config.json model_type values we import
ARCH = common.ENCODER_ARCH + (("conv_dim", "model.conv_dims"), ("conv_stride", "model.conv_strides"),
                              ("conv_kernel", "model.conv_kernels"), ("conv_bias", "model.conv_bias"),
                              ("num_conv_pos_embeddings", "model.pos_conv_depth"),
                              ("conv_pos_kernel_size", "model.pos_conv_kernel"),
                              ("num_conv_pos_embedding_groups", "model.pos_conv_groups"))
PREFIXES = ("data2vec_audio.", "")  # Data2VecAudioFor* heads, base model

BLOCK_MAP = (
    ("attention.q_proj", ("attention", "query"), "dense"),
    ("attention.k_proj", ("attention", "key"), "dense"),
    ("attention.v_proj", ("attention", "value"), "dense"),
    ("attention.out_proj", ("attention", "out"), "dense"),
    ("layer_norm", ("attn_norm",), "norm"),
    ("feed_forward.intermediate_dense", ("fc1",), "dense"),
    ("feed_forward.output_dense", ("fc2",), "dense"),
    ("final_layer_norm", ("mlp_norm",), "norm"),
)
# (torch suffix, flax leaf, transform torch->flax)
LEAVES = {
    "dense": (("weight", "kernel", "T"), ("bias", "bias", None)),
    "norm": (("weight", "scale", None), ("bias", "bias", None)),
    "conv": (("weight", "kernel", "conv"), ("bias", "bias", None)),
    "conv_nobias": (("weight", "kernel", "conv"),),
}


def _embed_map(cfg) -> list[tuple[str, tuple[str, ...], str]]:
  m = cfg.model
  out = []
  for i in range(len(m.conv_dims)):
    out.append((f"feature_extractor.conv_layers.{i}.conv", (f"conv_layers_{i}", "conv"),
                "conv" if m.conv_bias else "conv_nobias"))
    out.append((f"feature_extractor.conv_layers.{i}.layer_norm", (f"conv_layers_{i}", "layer_norm"), "norm"))
  out.append(("feature_projection.layer_norm", ("feature_norm",), "norm"))
  out.append(("feature_projection.projection", ("projection",), "dense"))
  for i in range(m.pos_conv_depth):
    out.append((f"encoder.pos_conv_embed.layers.{i}.conv", (f"pos_conv_{i}",), "conv"))
  return out


def _check_representable(cfg) -> None:
  m, enc = cfg.model, cfg.model.encoder
  bad = [(m.conv_norm != "layer", f"model.conv_norm={m.conv_norm!r} (HF: LayerNorm in every conv layer)"),
         (m.pos_conv != "data2vec", f"model.pos_conv={m.pos_conv!r} (HF: the 5-layer data2vec pos conv)"),
         (enc.pre_ln, "model.encoder.pre_ln=True"), (enc.layer_scale > 0, "model.encoder.layer_scale>0"),
         (not enc.key_bias, "model.encoder.key_bias=False"), (not enc.input_norm, "model.encoder.input_norm=False"),
         (enc.final_norm, "model.encoder.final_norm=True")]
  for is_bad, what in bad:
    if is_bad:
      raise config_lib.ConfigError(
          f"{what} has no Data2VecAudio equivalent (post-LN, LayerNorm conv extractor, data2vec "
          "pos conv, encoder input LayerNorm); use the configs/audio.py model settings to export")


def hf_config(cfg):
  """transformers.Data2VecAudioConfig for our audio model."""
  from transformers import Data2VecAudioConfig
  _check_representable(cfg)
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


_get, _put = common.get_path, common.put_path


def _to_torch(x, how):
  x = np.asarray(x, np.float32)
  return x.T if how == "T" else (x.transpose(2, 1, 0) if how == "conv" else x)


def _module_to_torch(hf_name: str, sub: dict, kind: str, out: dict) -> None:
  for suffix, leaf, how in LEAVES[kind]:
    out[f"{hf_name}.{suffix}"] = _to_torch(sub[leaf], how)


def to_hf_state(params, cfg) -> dict[str, np.ndarray]:
  """Our params (scanned or not, boxed or not) -> Data2VecAudioModel state dict (no prefix)."""
  _check_representable(cfg)
  params = common.unbox(params)
  out: dict[str, np.ndarray] = {}
  for hf_name, path, kind in _embed_map(cfg):
    _module_to_torch(hf_name, _get(params["embed"], path), kind, out)
  out["masked_spec_embed"] = np.asarray(params["embed"]["mask_emb"], np.float32)
  _module_to_torch("encoder.layer_norm", params["encoder"]["input_norm"], "norm", out)
  for i, block in enumerate(common.layer_list(params["encoder"])):
    for hf_name, path, kind in BLOCK_MAP:
      _module_to_torch(f"encoder.layers.{i}.{hf_name}", _get(block, path), kind, out)
  return out


def expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
  """Torch names and shapes of the base-model weights we read (masked_spec_embed excluded)."""
  m, enc = cfg.model, cfg.model.encoder
  d, f, g, k = enc.hidden, enc.mlp_dim, m.pos_conv_groups, m.pos_conv_kernel
  out: dict[str, tuple[int, ...]] = {}
  cin = 1
  for i, (c, kk) in enumerate(zip(m.conv_dims, m.conv_kernels)):
    out[f"feature_extractor.conv_layers.{i}.conv.weight"] = (c, cin, kk)
    if m.conv_bias:
      out[f"feature_extractor.conv_layers.{i}.conv.bias"] = (c,)
    out[f"feature_extractor.conv_layers.{i}.layer_norm.weight"] = (c,)
    out[f"feature_extractor.conv_layers.{i}.layer_norm.bias"] = (c,)
    cin = c
  out["feature_projection.layer_norm.weight"] = out["feature_projection.layer_norm.bias"] = (cin,)
  out["feature_projection.projection.weight"] = (d, cin)
  out["feature_projection.projection.bias"] = (d,)
  for i in range(m.pos_conv_depth):
    out[f"encoder.pos_conv_embed.layers.{i}.conv.weight"] = (d, d // g, k)
    out[f"encoder.pos_conv_embed.layers.{i}.conv.bias"] = (d,)
  out["encoder.layer_norm.weight"] = out["encoder.layer_norm.bias"] = (d,)
  dense = {"attention.q_proj": (d, d), "attention.k_proj": (d, d), "attention.v_proj": (d, d),
           "attention.out_proj": (d, d), "feed_forward.intermediate_dense": (f, d),
           "feed_forward.output_dense": (d, f)}
  for i in range(enc.num_layers):
    for hf_name, _, kind in BLOCK_MAP:
      name = f"encoder.layers.{i}.{hf_name}"
      if kind == "dense":
        out[f"{name}.weight"], out[f"{name}.bias"] = dense[hf_name], (dense[hf_name][0],)
      else:
        out[f"{name}.weight"] = out[f"{name}.bias"] = (d,)
  return out


def _strip_prefix(state: dict) -> dict:
  return common.strip_prefix(state, "feature_projection.projection.weight", PREFIXES, "Data2VecAudio")


def _from_torch(state: dict, hf_name: str, kind: str) -> dict:
  out = {}
  for suffix, leaf, how in LEAVES[kind]:
    x = np.asarray(state[f"{hf_name}.{suffix}"], np.float32)
    out[leaf] = x.T if how == "T" else (x.transpose(2, 1, 0) if how == "conv" else x)
  return out


def from_hf_state(state: dict, cfg) -> dict:
  """Data2VecAudio state dict (prefixed or bare) -> {'embed', 'encoder'} in our layout.

  A missing weight or one whose shape disagrees with cfg raises ValueError naming the first
  such weight. Heads (lm_head, projector, ...) are ignored. Without `masked_spec_embed`
  (checkpoints saved with mask_time_prob = 0) the mask embedding is initialised like ours,
  U[0, 1) seeded by cfg.seed.
  """
  _check_representable(cfg)
  state = _strip_prefix(state)
  for name, want in expected_shapes(cfg).items():
    if name not in state:
      raise ValueError(f"HF state dict lacks {name!r} (expected shape {want}): it does not match "
                       "the model.conv_* / pos_conv_* / encoder settings of the config")
    got = tuple(np.shape(state[name]))
    if got != want:
      raise ValueError(f"HF weight {name!r} has shape {got} but the config expects {want} "
                       "(check model.conv_dims / conv_kernels / pos_conv_* / encoder sizes)")
  embed: dict = {}
  for hf_name, path, kind in _embed_map(cfg):
    _put(embed, path, _from_torch(state, hf_name, kind))
  d = cfg.model.encoder.hidden
  if "masked_spec_embed" in state:
    if tuple(np.shape(state["masked_spec_embed"])) != (d,):
      raise ValueError(f"HF weight 'masked_spec_embed' has shape {np.shape(state['masked_spec_embed'])}, "
                       f"expected ({d},)")
    embed["mask_emb"] = np.asarray(state["masked_spec_embed"], np.float32)
  else:
    embed["mask_emb"] = np.random.default_rng(int(cfg.seed)).uniform(0, 1, (d,)).astype(np.float32)
  layers = []
  for i in range(cfg.model.encoder.num_layers):
    block: dict = {}
    for hf_name, path, kind in BLOCK_MAP:
      _put(block, path, _from_torch(state, f"encoder.layers.{i}.{hf_name}", kind))
    layers.append(block)
  encoder = common.set_layers({"input_norm": _from_torch(state, "encoder.layer_norm", "norm")}, layers,
                              cfg.model.encoder.scan)
  return {"embed": embed, "encoder": encoder}


def feature_extractor(cfg):
  """Wav2Vec2FeatureExtractor matching our input: mono, cfg rate, per-utterance normalisation
  (do_normalize) and an attention mask (the padding is masked out, as in our batches)."""
  from transformers import Wav2Vec2FeatureExtractor
  return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=int(cfg.data.sample_rate),
                                  padding_value=0.0, do_normalize=bool(cfg.data.normalize),
                                  return_attention_mask=True)


def export(params, cfg, out_dir: str, workdir: str) -> None:
  """Writes a Hugging Face directory for our audio model.

  out_dir/: config.json (Data2VecAudioConfig, architectures ["Data2VecAudioModel"]),
  model.safetensors (PyTorch names, float32), preprocessor_config.json
  (Wav2Vec2FeatureExtractor: AutoFeatureExtractor loads it), d2v_config.json (our resolved
  training config). No Flax weights: see the module docstring.
  """
  del workdir  # nothing data-derived to copy (no tokenizer)
  os.makedirs(out_dir, exist_ok=True)
  hf_cfg = hf_config(cfg)
  hf_cfg.architectures = ["Data2VecAudioModel"]
  state = to_hf_state(params, cfg)
  hf_cfg.save_pretrained(out_dir)
  common.save_state_dict(state, out_dir)
  feature_extractor(cfg).save_pretrained(out_dir)
  common.write_json(config_lib.to_dict(cfg), os.path.join(out_dir, "d2v_config.json"))


def load(path: str, cfg) -> dict:
  """HF directory (model.safetensors or pytorch_model.bin) -> {'embed', 'encoder'} params."""
  return from_hf_state(common.load_state_dict(path), cfg)
