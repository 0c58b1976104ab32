"""A fairseq data2vec model config (the checkpoint's cfg['model']) -> our config keys.

`settings(model_cfg, state)` gives the modality, the objective and the values of every key of
ours that the checkpoint fixes: the architecture (sizes, norms, dropouts, the positional
encoders), the targets, the loss, the EMA schedule and what the teacher shares, and for
data2vec 2.0 the clones, masks and decoder. Optimizer and data settings are not taken: they
belong to the run that continues from the checkpoint (the recipe's, or the command line's).
A fairseq setting we cannot reproduce is a ConfigError naming it.
"""

from __future__ import annotations

import numpy as np

from d2v_jax.config import ConfigError
from d2v_jax.fairseq_io.layouts import Layout, _conv_layers


def _need(cond: bool, what: str) -> None:
  if not cond:
    raise ConfigError(f"fairseq checkpoint uses {what}, which d2v_jax does not implement")


def _targets(m: dict) -> dict:
  _need(not m.get("batch_norm_target_layer") and not m.get("group_norm_target_layer"),
        "batch / group norm target layers")
  per = ("instance" if m.get("instance_norm_target_layer") else
         "layer" if m.get("layer_norm_target_layer") else "none")
  final = ("layer" if m.get("layer_norm_targets") else
           "instance" if m.get("instance_norm_targets") else "none")
  _need(not (m.get("layer_norm_targets") and m.get("instance_norm_targets")),
        "both layer_norm_targets and instance_norm_targets")
  scale = m.get("loss_scale")
  return {"target.top_k": int(m.get("average_top_k_layers", 8)), "target.layer_norm": per,
          "target.final_norm": final, "loss.beta": float(m.get("loss_beta", 0.0)),
          "loss.scale": None if scale is None or float(scale) <= 0 else float(scale),
          "loss.reduce_dims": "sum"}


def _tau(m: dict) -> dict:
  start, end = float(m.get("ema_decay", 0.999)), float(m.get("ema_end_decay", 0.9999))
  steps = m.get("ema_anneal_end_step")
  steps = int(steps) if isinstance(steps, (int, float, np.integer)) else 0
  return {"teacher.tau_start": start, "teacher.tau_end": end,
          "teacher.anneal_steps": steps if start != end else 0}


def _conv_spec(spec) -> dict:
  layers = _conv_layers(spec)
  return {"model.conv_dims": tuple(int(c) for c, _, _ in layers),
          "model.conv_kernels": tuple(int(k) for _, k, _ in layers),
          "model.conv_strides": tuple(int(s) for _, _, s in layers)}


def _text_v1(m: dict, state: dict) -> dict:
  t = m.get("transformer") or {}
  e = t.get("encoder") or {}
  enc = "encoder.sentence_encoder"
  _need(bool(t.get("layernorm_embedding", True)), "text without layernorm_embedding")
  _need(bool(t.get("no_scale_embedding", True)), "scaled token embeddings (no_scale_embedding=False)")
  _need(str(t.get("activation_fn", "gelu")) == "gelu", f"activation {t.get('activation_fn')!r}")
  _need(not e.get("normalize_before", False), "a pre-LN text encoder (normalize_before)")
  vocab, width = np.shape(state[f"{enc}.embed_tokens.weight"])
  positions = int(np.shape(state[f"{enc}.embed_positions.weight"])[0])
  out = {"model.vocab_size": int(vocab), "model.max_positions": positions,
         "model.pad_id": 1, "model.encoder.num_layers": int(e.get("layers", 12)),
         "model.encoder.hidden": int(width), "model.encoder.heads": int(e.get("attention_heads", 12)),
         "model.encoder.mlp_dim": int(e.get("ffn_embed_dim", 4 * width)),
         "model.encoder.dropout": float(t.get("dropout", 0.1)),
         "model.encoder.attention_dropout": float(t.get("attention_dropout", 0.0)),
         "model.encoder.activation_dropout": float(t.get("activation_dropout", 0.0)),
         "model.encoder.layerdrop": float(e.get("layerdrop", 0.0)),
         "model.embed_dropout": float(t.get("dropout", 0.1)),
         "head.layers": int(m.get("head_layers", 1)), "head.hidden_mult": 2,
         "target.layer_output": "ffn",
         "teacher.ema_subtrees": ("encoder",) if m.get("ema_transformer_layers_only", True)
         else ("embed", "encoder"), "teacher.share_local": False}
  return {**out, **_targets(m), **_tau(m)}


def _audio_v1(m: dict, state: dict) -> dict:
  _need(not m.get("layer_norm_first", False), "a pre-LN audio encoder (layer_norm_first)")
  depth = int(m.get("pos_conv_depth", 1))
  width = int(m.get("encoder_embed_dim", 768))
  if m.get("ema_transformer_only", True) or m.get("ema_layers_only", True):
    subtrees = ("encoder",) if m.get("ema_layers_only", True) else ("encoder", "embed/pos_conv_*")
    share = True
  else:
    subtrees, share = ("embed", "encoder", "head"), False
  out = {**_conv_spec(m.get("conv_feature_layers")),
         "model.conv_bias": bool(m.get("conv_bias", False)),
         "model.conv_norm": "layer" if m.get("extractor_mode", "default") == "layer_norm" else "group",
         "model.feature_dropout": float(m.get("dropout_input", 0.0)),
         "model.feature_grad_mult": float(m.get("feature_grad_mult", 1.0)),
         "model.pos_conv": "data2vec", "model.pos_conv_depth": depth,
         "model.pos_conv_kernel": max(3, int(m.get("conv_pos", 128)) // depth),
         "model.pos_conv_groups": int(m.get("conv_pos_groups", 16)), "model.alibi": False,
         "model.encoder.num_layers": int(m.get("encoder_layers", 12)), "model.encoder.hidden": width,
         "model.encoder.heads": int(m.get("encoder_attention_heads", 12)),
         "model.encoder.mlp_dim": int(m.get("encoder_ffn_embed_dim", 4 * width)),
         "model.encoder.dropout": float(m.get("dropout", 0.1)),
         "model.encoder.attention_dropout": float(m.get("attention_dropout", 0.1)),
         "model.encoder.activation_dropout": float(m.get("activation_dropout", 0.0)),
         "model.encoder.layerdrop": float(m.get("encoder_layerdrop", 0.0)),
         "model.encoder.pre_ln": False, "model.encoder.input_norm": True,
         "head.layers": 1, "target.layer_output": "ffn",
         "teacher.ema_subtrees": subtrees, "teacher.share_local": share}
  return {**out, **_targets(m), **_tau(m)}


def _vision_v1(m: dict, state: dict) -> dict:
  """fairseq's data2vec_vision port: BEiT blocks (pre-LN, q / v biases, layer scale, shared
  relative position bias), nn.LayerNorm's eps 1e-5, the teacher an EMA of the encoder (blocks,
  final norm, position table) fed the student's patch + CLS embeddings, no regression head."""
  width = int(m.get("embed_dim", 768))
  _need(bool(m.get("shared_rel_pos_bias", True)), "per-block relative position tables")
  out = {"model.image_size": int(m.get("image_size", 224)), "model.patch_size": int(m.get("patch_size", 16)),
         "model.channels": int(m.get("in_channels", 3)), "model.rel_pos_bias": True,
         "model.pos_embed": "none", "model.embed_dropout": 0.0,
         "model.encoder.num_layers": int(m.get("depth", 12)), "model.encoder.hidden": width,
         "model.encoder.heads": int(m.get("num_heads", 12)),
         "model.encoder.mlp_dim": int(width * float(m.get("mlp_ratio", 4))),
         "model.encoder.layer_norm_eps": 1e-5, "model.encoder.pre_ln": True,
         "model.encoder.key_bias": False, "model.encoder.input_norm": False,
         "model.encoder.final_norm": True,
         "model.encoder.layer_scale": float(m.get("layer_scale_init_value", 1e-4)),
         "model.encoder.dropout": 0.0,
         "model.encoder.attention_dropout": float(m.get("attention_dropout", 0.0)),
         "model.encoder.drop_path": float(m.get("drop_path", 0.1)),
         "head.layers": 0,
         "target.layer_output": "end" if m.get("end_of_block_targets", True) else "ffn"}
  if m.get("ema_transformer_only", True):
    out.update({"teacher.ema_subtrees": ("encoder", "embed/rel_pos_bias"), "teacher.share_local": True})
  else:
    out.update({"teacher.ema_subtrees": ("embed", "encoder"), "teacher.share_local": False})
  return {**out, **_targets(m), **_tau(m)}


def _multi(m: dict, state: dict, layout: Layout) -> dict:
  mod = layout.name.split("/")[1]
  mc = ((m.get("modalities") or {}).get(mod.lower())) or {}
  width, prenet = int(m.get("embed_dim", 768)), int(mc.get("prenet_depth", 0))
  _need(float(m.get("dropout_input", 0.0)) == 0.0, "dropout_input > 0 (data2vec 2.0)")
  _need(float(m.get("post_mlp_drop", 0.1)) == float(m.get("encoder_dropout", 0.1)),
        "post_mlp_drop != encoder_dropout (one dropout rate after attention and FFN here)")
  _need(float(m.get("recon_loss", 0.0)) == 0.0, "a pixel reconstruction loss (recon_loss)")
  _need(m.get("shared_decoder") is None, "a shared decoder")
  _need(not mc.get("transformer_decoder", False), "a Transformer decoder")
  _need(float(mc.get("mask_channel_prob", 0.0)) == 0.0, "channel masking")
  _need(float(mc.get("keep_masked_pct", 0.0)) == 0.0, "keep_masked_pct > 0")
  _need(mc.get("encoder_zero_mask", True), "encoder_zero_mask=False")
  dec = mc.get("decoder") or {}
  _need(not dec.get("add_positions_masked") and not dec.get("add_positions_all"),
        "positions added to the decoder input")
  drop_path = max(float(m.get("start_drop_path_rate", 0.0)), float(m.get("end_drop_path_rate", 0.0)))
  out = {"objective": "v2", "model.encoder.num_layers": int(m.get("depth", 8)) + prenet,
         "model.encoder.hidden": width, "model.encoder.heads": int(m.get("num_heads", 12)),
         "model.encoder.mlp_dim": int(width * float(m.get("mlp_ratio", 4))),
         "model.encoder.layer_norm_eps": float(m.get("norm_eps", 1e-6)),
         "model.encoder.pre_ln": bool(m.get("layer_norm_first", False)),
         "model.encoder.final_norm": bool(m.get("layer_norm_first", False)),
         "model.encoder.input_norm": not m.get("layer_norm_first", False) and not (mod == "TEXT" and prenet == 0),
         "model.encoder.key_bias": True, "model.encoder.layer_scale": 0.0,
         "model.encoder.dropout": float(m.get("encoder_dropout", 0.1)),
         "model.encoder.attention_dropout": float(m.get("attention_dropout", 0.1)),
         "model.encoder.activation_dropout": float(m.get("activation_dropout", 0.0)),
         "model.encoder.layerdrop": float(m.get("layerdrop", 0.0)),
         "model.encoder.drop_path": drop_path,
         "target.layer_output": "end" if m.get("end_of_block_targets", False) else "ffn",
         "v2.clone_batch": int(m.get("clone_batch", 1)),
         "v2.mask_prob": float(mc.get("mask_prob", 0.7)),
         "v2.mask_adjust": float(mc.get("mask_prob_adjust", 0.0)),
         "v2.mask_length": int(mc.get("mask_length", 5)),
         "v2.mask_noise_std": float(mc.get("mask_noise_std", 0.01)),
         "v2.decoder.kind": "2d" if mod == "IMAGE" else "1d",
         "v2.decoder.dim": int(dec.get("decoder_dim", 384)),
         "v2.decoder.kernel": int(dec.get("decoder_kernel", 5)),
         "v2.decoder.groups": int(dec.get("decoder_groups", 16)),
         "v2.decoder.layers": int(dec.get("decoder_layers", 5)),
         "v2.decoder.residual": bool(dec.get("decoder_residual", True)),
         "v2.decoder.proj_layers": int(dec.get("projection_layers", 1)),
         "v2.decoder.proj_ratio": float(dec.get("projection_ratio", 2.0)),
         "v2.decoder.input_dropout": float(dec.get("input_dropout", 0.1)),
         # fairseq re-initialises the audio / image decoders, not the text one (init_bert_params)
         "v2.decoder.proj_init": "bert" if mod == "TEXT" else "torch"}
  encoder_only, ema_local = bool(m.get("ema_encoder_only", True)), bool(mc.get("ema_local_encoder", False))
  if mod == "TEXT":
    p = "modality_encoders.TEXT.local_encoder"
    _need(bool(mc.get("learned_pos", True)) and not mc.get("no_token_positional_embeddings", False),
          "text without learned positions")
    _need(bool(mc.get("no_scale_embedding", True)), "scaled token embeddings")
    _need(bool(mc.get("layernorm_embedding", True)), "text without layernorm_embedding")
    _need(not mc.get("use_alibi_encoder", False), "ALiBi for text")
    out.update({"model.vocab_size": int(np.shape(state[f"{p}.embed_tokens.weight"])[0]),
                "model.max_positions": int(np.shape(state[f"{p}.embed_positions.weight"])[0]),
                "model.pad_id": 1, "model.embed_dropout": float(mc.get("dropout", 0.1))})
    subtrees = ("encoder",) if encoder_only else ("embed", "encoder") if ema_local else ("encoder",)
  elif mod == "AUDIO":
    alibi = bool(mc.get("use_alibi_encoder", False))
    if alibi:
      _need(mc.get("learned_alibi_scale_per_head", False) and not mc.get("learned_alibi_scale_per_layer", False)
            and not mc.get("learned_alibi", False), "ALiBi other than a learned per-head scale")
    pos_depth = int(mc.get("conv_pos_depth", 5))
    _need(not mc.get("conv_pos_pre_ln", False), "conv_pos_pre_ln")
    out.update({**_conv_spec(mc.get("feature_encoder_spec")), "model.conv_bias": False,
                "model.conv_norm": "layer" if mc.get("extractor_mode", "layer_norm") == "layer_norm" else "group",
                "model.feature_dropout": 0.0, "model.pos_conv": "data2vec",
                "model.pos_conv_depth": pos_depth,
                "model.pos_conv_kernel": max(3, int(mc.get("conv_pos_width", 95)) // pos_depth),
                "model.pos_conv_groups": int(mc.get("conv_pos_groups", 16)), "model.alibi": alibi})
    subtrees = ("encoder",) if encoder_only else \
        ("embed", "encoder") if ema_local else ("encoder", "embed/pos_conv_*") + \
        (("embed/alibi_scale",) if alibi else ())
  else:   # IMAGE
    _need(bool(mc.get("fixed_positions", True)), "images without fixed positions")
    _need(not mc.get("use_alibi_encoder", False), "ALiBi for images")
    _need(int(mc.get("num_extra_tokens", 0)) == 1, "a number of extra tokens other than 1 (CLS)")
    _need(int(mc.get("embed_dim", width)) == width, "a patch embedding narrower than the encoder")
    out.update({"model.image_size": int(mc.get("input_size", 224)),
                "model.patch_size": int(mc.get("patch_size", 16)),
                "model.channels": int(mc.get("in_chans", 3)), "model.rel_pos_bias": False,
                "model.pos_embed": "sincos", "model.embed_dropout": 0.0,
                "v2.cls_loss": 0.0})
    subtrees = ("encoder",) if encoder_only else ("embed", "encoder") if ema_local else ("encoder",)
  out["teacher.ema_subtrees"] = subtrees
  out["teacher.share_local"] = encoder_only or not ema_local
  return {**out, **_targets(m), **_tau(m)}


def settings(model_cfg: dict, state: dict, layout: Layout) -> dict:
  """Our config keys -> values fixed by the checkpoint (see the module doc)."""
  if layout.name == "data2vec_text":
    return _text_v1(model_cfg, state)
  if layout.name == "data2vec_audio":
    return _audio_v1(model_cfg, state)
  if layout.name == "data2vec_vision":
    return _vision_v1(model_cfg, state)
  return _multi(model_cfg, state, layout)
