"""Tiny fairseq data2vec models (random weights, dropout 0, a teacher that differs from the
student) for the parity and checkpoint tests, built from fairseq's own config classes.
`plain(cfg)` is the nested-dict form a checkpoint's cfg["model"] takes."""

from __future__ import annotations

import dataclasses
import enum

FS_CONV = "[(16, 10, 5)] + [(16, 3, 2)] * 2"   # 20x down-sampling: 1,600 samples -> 79 frames


def dictionary(fs, n: int):
  d = fs.Dictionary()
  for i in range(n):
    d.add_symbol(f"w{i}")
  d.add_symbol("<mask>")
  return d


def plain(x):
  """fairseq dataclass configs -> the nested plain dicts a checkpoint's cfg becomes."""
  if dataclasses.is_dataclass(x):
    return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
  if isinstance(x, dict):
    return {k: plain(v) for k, v in x.items()}
  if isinstance(x, enum.Enum):
    return x.name
  return x


def v2_text_model(fs, vocab):
  torch, d2, mods = fs.torch, fs.data2vec2, fs.modalities
  dec = mods.modules.D2vDecoderConfig(decoder_dim=32, decoder_groups=1, decoder_kernel=5,
                                      decoder_layers=2, input_dropout=0.0, decoder_residual=False,
                                      projection_layers=2, projection_ratio=2.0)
  tcfg = mods.text.D2vTextConfig(mask_prob=0.5, mask_length=1, mask_noise_std=0.0, prenet_depth=0,
                                 dropout=0.0, decoder=dec, max_source_positions=30,
                                 num_alibi_heads=2, model_depth=2)
  cfg = d2.Data2VecMultiConfig(
      loss_beta=0, loss_scale=1, depth=2, embed_dim=32, num_heads=2, clone_batch=2,
      ema_decay=0.9, ema_end_decay=0.99, ema_anneal_end_step=10, ema_encoder_only=True,
      average_top_k_layers=2, instance_norm_target_layer=True, layerdrop=0, norm_eps=1e-5,
      encoder_dropout=0, post_mlp_drop=0, attention_dropout=0, activation_dropout=0,
      supported_modality=fs.Modality.TEXT, max_update=10, seed=1)
  # a new modalities object: the dataclass default is one instance shared by every config
  # (fairseq's mutable defaults), and a full-size model built later must not see tcfg
  cfg.modalities = dataclasses.replace(cfg.modalities, text=tcfg)

  class Task:
    source_dictionary = vocab
  torch.manual_seed(0)
  model = d2.Data2VecMultiModel.build_model(cfg, task=Task)
  with torch.no_grad():   # a teacher that differs from the student
    for v in model.ema.fp32_params.values():
      v.add_(0.02 * torch.randn_like(v))
    model.ema.restore(model.ema.fp32_params)
  return model, {**plain(cfg), "_name": "data2vec_multi"}


def v2_audio_model(fs):
  torch, d2, mods = fs.torch, fs.data2vec2, fs.modalities
  dec = mods.modules.D2vDecoderConfig(decoder_dim=16, decoder_groups=4, decoder_kernel=3,
                                      decoder_layers=2, input_dropout=0.0, decoder_residual=True,
                                      projection_layers=1)
  acfg = mods.audio.D2vAudioConfig(
      feature_encoder_spec=FS_CONV, conv_pos_width=12, conv_pos_depth=2, conv_pos_groups=4,
      prenet_depth=0, prenet_dropout=0.0, mask_prob=0.5, mask_length=3, mask_noise_std=0.0,
      use_alibi_encoder=True, learned_alibi_scale=True, learned_alibi_scale_per_head=True,
      decoder=dec, num_alibi_heads=2, model_depth=2)
  cfg = d2.Data2VecMultiConfig(
      loss_beta=0, loss_scale=None, depth=2, embed_dim=32, num_heads=2, clone_batch=2,
      ema_decay=0.9, ema_end_decay=0.99, ema_anneal_end_step=10, ema_encoder_only=False,
      average_top_k_layers=2, instance_norm_target_layer=True, layerdrop=0, norm_eps=1e-5,
      encoder_dropout=0, post_mlp_drop=0, attention_dropout=0, activation_dropout=0,
      supported_modality=fs.Modality.AUDIO, max_update=10, seed=1)
  cfg.modalities = dataclasses.replace(cfg.modalities, audio=acfg)   # not the shared default
  torch.manual_seed(0)
  model = d2.Data2VecMultiModel.build_model(cfg)
  with torch.no_grad():   # a teacher that differs from the student, ALiBi scales off 1
    for v in model.ema.fp32_params.values():
      v.add_(0.02 * torch.randn_like(v))
    model.modality_encoders["AUDIO"].alibi_scale.mul_(torch.tensor([0.5, 1.5]).view(1, 1, 2, 1, 1))
    model.ema.restore(model.ema.fp32_params)
  return model, {**plain(cfg), "_name": "data2vec_multi"}


def v2_image_model(fs):
  torch, d2, mods = fs.torch, fs.data2vec2, fs.modalities
  dec = mods.modules.D2vDecoderConfig(decoder_dim=32, decoder_groups=4, decoder_kernel=3,
                                      decoder_layers=2, input_dropout=0.0, decoder_residual=True)
  icfg = mods.images.D2vImageConfig(
      input_size=16, patch_size=4, embed_dim=32, prenet_depth=1, inverse_mask=True,
      mask_prob=0.75, mask_length=1, mask_noise_std=0.0, ema_local_encoder=True,
      num_extra_tokens=1, init_extra_token_zero=False, use_alibi_encoder=False, decoder=dec,
      num_alibi_heads=2, model_depth=2)
  cfg = d2.Data2VecMultiConfig(
      loss_beta=0, loss_scale=None, depth=2, embed_dim=32, num_heads=2, clone_batch=2,
      ema_decay=0.9, ema_end_decay=0.99, ema_anneal_end_step=10, ema_encoder_only=False,
      average_top_k_layers=2, instance_norm_target_layer=True, layer_norm_targets=True,
      norm_eps=1e-6, encoder_dropout=0, post_mlp_drop=0, attention_dropout=0,
      activation_dropout=0, cls_loss=0.01, supported_modality=fs.Modality.IMAGE, max_update=10,
      seed=1)
  cfg.modalities = dataclasses.replace(cfg.modalities, image=icfg)   # not the shared default
  torch.manual_seed(0)
  model = d2.Data2VecMultiModel.build_model(cfg)
  with torch.no_grad():   # a teacher that differs from the student
    for k, v in model.ema.fp32_params.items():
      if "fixed_positional" not in k:
        v.add_(0.02 * torch.randn_like(v))
    model.ema.restore(model.ema.fp32_params)
  return model, {**plain(cfg), "_name": "data2vec_multi"}


def perturb_ema(fs, model, keep=lambda k: True):
  """A teacher that differs from the student in what fairseq averages (not in its copies)."""
  torch = fs.torch
  with torch.no_grad():
    for k, v in model.ema.fp32_params.items():
      if keep(k) and v.is_floating_point():
        v.add_(0.02 * torch.randn_like(v))
    model.ema.restore(model.ema.fp32_params)


def v1_text_model(fs, vocab):
  torch = fs.torch
  from fairseq.models.transformer.transformer_config import TransformerConfig
  t = TransformerConfig()
  t.encoder.embed_dim, t.encoder.ffn_embed_dim, t.encoder.layers = 32, 64, 2
  t.encoder.attention_heads, t.encoder.normalize_before, t.encoder.learned_pos = 2, False, True
  t.layernorm_embedding, t.no_scale_embedding, t.activation_fn = True, True, "gelu"
  t.dropout = t.attention_dropout = t.activation_dropout = 0.0
  t.max_source_positions = 30
  cfg = fs.data2vec_text.Data2VecTextConfig(
      max_positions=30, head_layers=2, transformer=t, loss_beta=4.0, loss_scale=1.0,
      average_top_k_layers=2, layer_norm_target_layer=True, ema_decay=0.9, ema_end_decay=0.99,
      ema_anneal_end_step=10)

  class Task:
    source_dictionary = vocab

    class cfg:
      data = ""
  torch.manual_seed(0)
  model = fs.data2vec_text.Data2VecTextModel.build_model(cfg, Task)
  model.set_num_updates(0)        # fairseq makes the EMA teacher here
  perturb_ema(fs, model.encoder, keep=lambda k: k.startswith("layers."))
  return model, {**plain(cfg), "_name": "data2vec_text"}


def v1_audio_model(fs):
  torch = fs.torch
  cfg = fs.data2vec_audio.Data2VecAudioConfig(
      extractor_mode="layer_norm", conv_feature_layers=FS_CONV, conv_bias=False,
      encoder_layers=2, encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=2,
      conv_pos=12, pos_conv_depth=2, conv_pos_groups=4, dropout=0.0, attention_dropout=0.0,
      activation_dropout=0.0, dropout_input=0.0, encoder_layerdrop=0.0, layer_norm_first=False,
      average_top_k_layers=2, instance_norm_target_layer=True, loss_beta=0.0, loss_scale=None,
      ema_decay=0.9, ema_end_decay=0.99, ema_anneal_end_step=10, max_update=10)
  torch.manual_seed(0)
  model = fs.data2vec_audio.Data2VecAudioModel.build_model(cfg)
  model.set_num_updates(0)
  perturb_ema(fs, model, keep=lambda k: not k.startswith("pos_conv."))
  return model, {**plain(cfg), "_name": "data2vec_audio"}


def v1_vision_model(fs):
  torch = fs.torch
  cfg = fs.data2vec_vision.Data2VecVisionConfig(
      image_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2, drop_path=0.0,
      attention_dropout=0.0, layer_scale_init_value=0.1, average_top_k_layers=2,
      end_of_block_targets=True, layer_norm_target_layer=True, layer_norm_targets=True,
      loss_beta=0.0, loss_scale=None, ema_decay=0.9, ema_end_decay=0.99, ema_anneal_end_step=10)
  torch.manual_seed(0)
  model = fs.data2vec_vision.Data2VecVisionModel.build_model(cfg)
  model.set_num_updates(0)
  perturb_ema(fs, model, keep=lambda k: "relative_position_index" not in k)
  return model, {**plain(cfg), "_name": "data2vec_vision"}
