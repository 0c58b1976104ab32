"""Where each fairseq data2vec weight lives in our parameter tree, per fairseq model.

A `Layout` lists (fairseq module name, our path, kind) for the modules outside the
Transformer blocks and, once, for the modules inside a block; `layer_name(i)` gives block i's
fairseq prefix. Kinds are those of d2v_jax/hf/common.py (PyTorch layouts: Linear weight
(out, in), Conv1d (out, in/groups, k), ...) plus `qkv` (fairseq data2vec 2.0's fused
attention projection), `qkv_qv` (the same without a k bias, q / v biases apart: fairseq's
BEiT port) and `alibi` (the learned ALiBi scale).

The models (fairseq `_name`): data2vec_text, data2vec_audio and data2vec_vision (1.0; the last
is fairseq's own port, see _vision_v1) and data2vec_multi (2.0) with its text, audio or image
encoder. Also per layout: where the EMA teacher's weights
sit in the checkpoint (`ema_key`, keyed relative to `ema_prefix`), which of our weights
fairseq does not have (`fill`: filled on import, folded or checked on export) and which
fairseq entries carry no weights of ours (`ignore`: buffers, heads fairseq drops).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

from d2v_jax.config import ConfigError

# The blocks of fairseq 1.0 (TransformerSentenceEncoderLayer / TransformerEncoderLayer).
V1_BLOCK = (("self_attn.q_proj", ("attention", "query"), "dense"),
            ("self_attn.k_proj", ("attention", "key"), "dense"),
            ("self_attn.v_proj", ("attention", "value"), "dense"),
            ("self_attn.out_proj", ("attention", "out"), "dense"),
            ("self_attn_layer_norm", ("attn_norm",), "norm"),
            ("fc1", ("fc1",), "dense"),
            ("fc2", ("fc2",), "dense"),
            ("final_layer_norm", ("mlp_norm",), "norm"))
# data2vec 2.0's AltBlock: norm1 / norm2 sit where our attn_norm / mlp_norm do in both the
# post-LN and the pre-LN (layer_norm_first) form.
V2_BLOCK = (("norm1", ("attn_norm",), "norm"),
            ("attn.qkv", ("attention",), "qkv"),
            ("attn.proj", ("attention", "out"), "dense"),
            ("norm2", ("mlp_norm",), "norm"),
            ("mlp.fc1", ("fc1",), "dense"),
            ("mlp.fc2", ("fc2",), "dense"))


@dataclasses.dataclass(frozen=True)
class Layout:
  name: str                        # e.g. "data2vec_multi/TEXT"
  modality: str                    # ours: text | audio | vision
  objective: str                   # v1 | v2
  top: tuple                       # (fairseq module, our path, kind)
  block: tuple
  layer_name: Callable[[int], str]
  num_layers: int
  ema_key: str                     # state-dict entry holding the EMA teacher (a dict)
  ema_prefix: str                  # what the EMA dict's keys are relative to
  ema_scope: Callable[[str], bool]  # which fairseq names the EMA teacher holds (export)
  fill: tuple = ()                 # our paths fairseq lacks
  ignore: tuple = ()               # regexes of fairseq entries that are not ours


def _head(prefix: str, layers: int) -> tuple:
  """fairseq regression head nn.Sequential(Linear, GELU, ..., Linear) -> our head."""
  if layers == 1:
    return ((f"{prefix}.0", ("head", "out"), "dense"),)
  return tuple((f"{prefix}.{2 * i}", ("head", f"dense_{i}"), "dense") for i in range(layers - 1)) + \
      ((f"{prefix}.{2 * (layers - 1)}", ("head", "out"), "dense"),)


def _conv_stack(prefix: str, n: int, mode: str, bias: bool) -> tuple:
  """wav2vec2 ConvFeatureExtractionModel: conv_layers.i = Sequential(Conv1d, Dropout, norm, GELU);
  the layer norm of mode layer_norm sits inside Sequential(TransposeLast, LayerNorm, TransposeLast)."""
  out = []
  for i in range(n):
    out.append((f"{prefix}.conv_layers.{i}.0", (f"conv_layers_{i}", "conv"),
                "conv1d" if bias else "conv1d_nobias"))
    if mode == "layer_norm":
      out.append((f"{prefix}.conv_layers.{i}.2.1", (f"conv_layers_{i}", "layer_norm"), "norm"))
    elif i == 0:   # mode default: GroupNorm(C, C) on the first layer only
      out.append((f"{prefix}.conv_layers.0.2", ("conv_layers_0", "layer_norm"), "norm"))
  return tuple((name, ("embed",) + path, kind) for name, path, kind in out)


def _decoder(prefix: str, layers: int, proj_layers: int, dims: int) -> tuple:
  conv = "conv2d" if dims == 2 else "conv1d"
  out = [(f"{prefix}.blocks.{j}.0", ("decoder", f"conv_{j}"), conv) for j in range(layers)]
  if proj_layers == 1:
    out.append((f"{prefix}.proj", ("decoder", "proj"), "dense"))
  else:
    out += [(f"{prefix}.proj.{2 * k}", ("decoder", f"proj_{k}"), "dense") for k in range(proj_layers - 1)]
    out.append((f"{prefix}.proj.{2 * (proj_layers - 1)}", ("decoder", "proj"), "dense"))
  return tuple(out)


def _text_v1(m: dict) -> Layout:
  enc = "encoder.sentence_encoder"
  t = m.get("transformer") or {}
  layers = int((t.get("encoder") or {}).get("layers", m.get("encoder_layers", 12)))
  top = ((f"{enc}.embed_tokens", ("embed", "word"), "embed"),
         (f"{enc}.embed_positions", ("embed", "position"), "embed"),
         (f"{enc}.layernorm_embedding", ("embed", "norm"), "norm")) + \
      _head("encoder.regression_head", int(m.get("head_layers", 1)))
  return Layout("data2vec_text", "text", "v1", top, V1_BLOCK, lambda i: f"{enc}.layers.{i}", layers,
                ema_key="encoder._ema", ema_prefix=f"{enc}.",
                ema_scope=lambda n: n.startswith(f"{enc}."),
                fill=(("embed", "token_type", "embedding"),),
                ignore=(r"encoder\.sentence_encoder\.version$", r"encoder\.lm_head\..*",
                        r"classification_heads\..*"))


def _audio_v1(m: dict) -> Layout:
  convs = _conv_layers(m.get("conv_feature_layers"))
  depth = int(m.get("pos_conv_depth", 1))
  if depth < 2:
    raise ConfigError("data2vec_audio with pos_conv_depth=1 (wav2vec2's weight-normalised "
                      "positional conv) is not importable; data2vec audio uses pos_conv_depth=5")
  top = (("mask_emb", ("embed", "mask_emb"), "param"),) + \
      _conv_stack("feature_extractor", len(convs), m.get("extractor_mode", "default"),
                  bool(m.get("conv_bias", False))) + \
      (("layer_norm", ("embed", "feature_norm"), "norm"),
       ("post_extract_proj", ("embed", "projection"), "dense")) + \
      tuple((f"encoder.pos_conv.{j}.0", ("embed", f"pos_conv_{j}"), "conv1d") for j in range(depth)) + \
      (("encoder.layer_norm", ("encoder", "input_norm"), "norm"),
       ("final_proj", ("head", "out"), "dense"))
  return Layout("data2vec_audio", "audio", "v1", top, V1_BLOCK, lambda i: f"encoder.layers.{i}",
                int(m.get("encoder_layers", 12)), ema_key="_ema", ema_prefix="encoder.",
                ema_scope=lambda n: n.startswith("encoder."))


def _conv_layers(spec) -> list:
  spec = spec or "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2"
  if not re.fullmatch(r"[\[\]\(\)\d\s,+*]+", str(spec)):
    raise ConfigError(f"fairseq conv feature spec {spec!r} is not a list of (dim, kernel, stride)")
  return list(eval(str(spec), {"__builtins__": {}}))  # digits, brackets, + and * only (checked)


def _multi(m: dict) -> Layout:
  mod = str(m.get("supported_modality") or "")
  mod = mod.split(".")[-1].upper()
  mcfg = (m.get("modalities") or {}).get(mod.lower()) or {}
  p = f"modality_encoders.{mod}"
  depth, prenet = int(m.get("depth", 8)), int(mcfg.get("prenet_depth", 0))
  dec = mcfg.get("decoder")
  top: tuple = ()
  fill: tuple = ()
  if mod == "TEXT":
    modality = "text"
    top = ((f"{p}.local_encoder.embed_tokens", ("embed", "word"), "embed"),
           (f"{p}.local_encoder.embed_positions", ("embed", "position"), "embed"),
           (f"{p}.local_encoder.layernorm_embedding", ("embed", "norm"), "norm"))
    fill = (("embed", "token_type", "embedding"),)
  elif mod == "AUDIO":
    modality = "audio"
    convs = _conv_layers(mcfg.get("feature_encoder_spec"))
    pos_depth = int(mcfg.get("conv_pos_depth", 5))
    top = _conv_stack(f"{p}.local_encoder", len(convs), mcfg.get("extractor_mode", "layer_norm"),
                      False) + \
        ((f"{p}.project_features.1", ("embed", "feature_norm"), "norm"),
         (f"{p}.project_features.2", ("embed", "projection"), "dense")) + \
        tuple((f"{p}.relative_positional_encoder.{j + 1}.0", ("embed", f"pos_conv_{j}"), "conv1d")
              for j in range(pos_depth))
    if mcfg.get("use_alibi_encoder", False):
      top += ((f"{p}.alibi_scale", ("embed", "alibi_scale"), "alibi"),)
    fill = (("embed", "mask_emb"),)   # v1's mask embedding: data2vec 2.0 zeroes masked frames
  elif mod == "IMAGE":
    modality = "vision"
    top = ((f"{p}.local_encoder.proj", ("embed", "patch"), "conv2d"),
           (f"{p}.extra_tokens", ("embed", "cls_token"), "token"))
    fill = (("embed", "mask_token"),)  # v1's mask token: the v2 student drops masked patches
  else:
    raise ConfigError(f"data2vec_multi checkpoint for modality {mod or '?'!r}: importable are "
                      "TEXT, AUDIO and IMAGE (model.supported_modality)")
  if not (mod == "TEXT" and prenet == 0) and not m.get("layer_norm_first", False):
    top += ((f"{p}.context_encoder.norm", ("encoder", "input_norm"), "norm"),)
  if m.get("layer_norm_first", False):
    top += (("norm", ("encoder", "final_norm"), "norm"),)
  if dec:
    top += _decoder(f"{p}.decoder", int(dec.get("decoder_layers", 5)),
                    int(dec.get("projection_layers", 1)), 2 if mod == "IMAGE" else 1)

  def layer_name(i: int) -> str:
    return f"{p}.context_encoder.blocks.{i}" if i < prenet else f"blocks.{i - prenet}"

  encoder_only = bool(m.get("ema_encoder_only", True))
  ema_local = bool(mcfg.get("ema_local_encoder", False))

  def ema_scope(name: str) -> bool:
    if encoder_only:
      return name.startswith("blocks.")
    if name.startswith(f"{p}.decoder."):
      return False
    if not ema_local and (name.startswith(f"{p}.local_encoder.")
                          or name.startswith(f"{p}.project_features.")):
      return False
    return True

  return Layout(f"data2vec_multi/{mod}", modality, "v2", top, V2_BLOCK, layer_name, depth + prenet,
                ema_key="_ema", ema_prefix="blocks." if encoder_only else "", ema_scope=ema_scope,
                fill=fill, ignore=(rf"{re.escape(p)}\.fixed_positional_encoder\.positions$",))


# fairseq's data2vec_vision port (BEiT blocks): a fused bias-free qkv weight with separate
# q / v biases (no k bias), layer scales gamma_1 / gamma_2, MLP as nn.Sequential.
VISION_V1_BLOCK = (("norm1", ("attn_norm",), "norm"),
                   ("attn", ("attention",), "qkv_qv"),
                   ("attn.proj", ("attention", "out"), "dense"),
                   ("norm2", ("mlp_norm",), "norm"),
                   ("mlp.0", ("fc1",), "dense"),
                   ("mlp.2", ("fc2",), "dense"),
                   ("gamma_1", ("lambda_1",), "param"),
                   ("gamma_2", ("lambda_2",), "param"))


def _vision_v1(m: dict) -> Layout:
  """fairseq examples/data2vec/models/data2vec_vision.py. Its `final_proj` is created but never
  applied (the encoder's normed output is the prediction): not imported, our head.layers=0."""
  if not m.get("shared_rel_pos_bias", True):
    raise ConfigError("fairseq data2vec_vision with per-block relative position tables "
                      "(shared_rel_pos_bias=False) is not importable")
  top = (("patch_embed.conv", ("embed", "patch"), "conv2d"),
         ("cls_emb", ("embed", "cls_token"), "token"),
         ("mask_emb", ("embed", "mask_token"), "token"),
         ("encoder.rel_pos_bias.relative_position_bias_table", ("embed", "rel_pos_bias"), "param"),
         ("encoder.norm", ("encoder", "final_norm"), "norm"))
  return Layout("data2vec_vision", "vision", "v1", top, VISION_V1_BLOCK,
                lambda i: f"encoder.blocks.{i}", int(m.get("depth", 12)), ema_key="_ema",
                ema_prefix="encoder.", ema_scope=lambda n: n.startswith("encoder."),
                ignore=(r"final_proj\..*", r"encoder\.rel_pos_bias\.relative_position_index$"))


def layout(model_cfg: dict) -> Layout:
  """The layout of a fairseq model config (the checkpoint's cfg['model'])."""
  name = str(model_cfg.get("_name") or model_cfg.get("arch") or "")
  if name == "data2vec_text":
    return _text_v1(model_cfg)
  if name == "data2vec_audio":
    return _audio_v1(model_cfg)
  if name == "data2vec_multi":
    return _multi(model_cfg)
  if name == "data2vec_vision":
    return _vision_v1(model_cfg)
  raise ConfigError(f"fairseq model {name or '?'!r} is not a data2vec model we import "
                    "(data2vec_text, data2vec_audio, data2vec_vision, data2vec_multi)")
