"""data2vec 2.0 audio with ALiBi (fairseq `use_alibi_encoder` with a learned per-head scale)
on transformers' Data2VecAudio: written by d2v_jax's export, loaded with
AutoModel / AutoModelForCTC .from_pretrained(dir, trust_remote_code=True).

Every encoder layer's attention gets the same additive bias: -slope_h * |i - j| times the
learned scale of head h (clamped at 0), plus the key padding. Slopes as fairseq / ALiBi: a
geometric sequence starting at 2^(-8/n) for n heads (a power of two), else the slopes of the
largest power of two below n followed by every other slope of twice that power.
"""

import math

import torch
from torch import nn
from transformers import Data2VecAudioConfig, Data2VecAudioForCTC, Data2VecAudioModel
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.data2vec.modeling_data2vec_audio import Data2VecAudioEncoder


class Data2VecAudioAlibiConfig(Data2VecAudioConfig):
  model_type = "data2vec-audio-alibi"


def alibi_slopes(heads: int) -> torch.Tensor:
  def power_of_2(n):
    start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
    return [start * start ** i for i in range(n)]
  if math.log2(heads).is_integer():
    return torch.tensor(power_of_2(heads))
  lower = 2 ** math.floor(math.log2(heads))
  return torch.tensor(power_of_2(lower) + power_of_2(2 * lower)[0::2][:heads - lower])


class Data2VecAudioAlibiEncoder(Data2VecAudioEncoder):
  def __init__(self, config):
    super().__init__(config)
    self.alibi_scale = nn.Parameter(torch.ones(config.num_attention_heads))

  def attention_bias(self, length: int, frame_mask, dtype):
    pos = torch.arange(length, device=self.alibi_scale.device)
    dist = -(pos[None, :] - pos[:, None]).abs().float()
    slopes = alibi_slopes(self.config.num_attention_heads).to(dist.device)
    bias = (slopes[:, None, None] * dist[None]) * self.alibi_scale.clamp(min=0)[:, None, None]
    bias = bias[None]                                               # [1, H, T, T]
    if frame_mask is not None:
      hidden = (1.0 - frame_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
      bias = bias + hidden                                          # [B, H, T, T]
    return bias.to(dtype)

  def forward(self, hidden_states, attention_mask=None, output_attentions=False,
              output_hidden_states=False, return_dict=True):
    if attention_mask is not None:   # padded frames are zero before the positional conv
      hidden_states = hidden_states.masked_fill(~attention_mask.bool()[..., None], 0.0)
    hidden_states = hidden_states + self.pos_conv_embed(hidden_states)
    hidden_states = self.dropout(self.layer_norm(hidden_states))
    bias = self.attention_bias(hidden_states.shape[1], attention_mask, hidden_states.dtype)
    states, attentions = (), ()
    for layer in self.layers:
      if output_hidden_states:
        states += (hidden_states,)
      if self.training and torch.rand([]) < self.config.layerdrop:
        continue
      out = layer(hidden_states, attention_mask=bias, output_attentions=output_attentions)
      hidden_states = out[0]
      if output_attentions:
        attentions += (out[1],)
    if output_hidden_states:
      states += (hidden_states,)
    if not return_dict:
      return tuple(v for v in (hidden_states, states or None, attentions or None) if v is not None)
    return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=states or None,
                           attentions=attentions or None)


class Data2VecAudioAlibiModel(Data2VecAudioModel):
  config_class = Data2VecAudioAlibiConfig

  def __init__(self, config):
    super().__init__(config)
    self.encoder = Data2VecAudioAlibiEncoder(config)
    self.post_init()


class Data2VecAudioAlibiForCTC(Data2VecAudioForCTC):
  config_class = Data2VecAudioAlibiConfig

  def __init__(self, config, target_lang=None):
    super().__init__(config, target_lang)
    self.data2vec_audio = Data2VecAudioAlibiModel(config)
    self.post_init()
