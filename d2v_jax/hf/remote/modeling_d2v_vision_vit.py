"""fairseq's data2vec 2.0 ViT (post-LN blocks, fixed 2-D sin-cos positions, a CLS token, a
LayerNorm on [CLS; patches]) for transformers: written by d2v_jax's export, loaded with
AutoModel.from_pretrained(dir, trust_remote_code=True). The blocks are BERT's (a post-LN
Transformer layer with exact GELU), so the weight names are BERT's under `encoder.layer.<i>`.

Input pixel_values [B, C, H, W] (normalised as preprocessor_config.json says); output
last_hidden_state [B, 1 + patches, D], CLS first. The file travels alone with the weights (no
d2v_jax where it runs): sincos_2d repeats d2v_jax.models.vision.sincos_2d in torch's world.
"""

import numpy as np
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.bert.modeling_bert import BertEncoder


class Data2Vec2VisionConfig(PretrainedConfig):
  model_type = "data2vec2-vision"

  def __init__(self, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0, layer_norm_eps=1e-6, image_size=224,
               patch_size=16, num_channels=3, initializer_range=0.02, **kwargs):
    super().__init__(**kwargs)
    self.hidden_size, self.num_hidden_layers = hidden_size, num_hidden_layers
    self.num_attention_heads, self.intermediate_size = num_attention_heads, intermediate_size
    self.hidden_act, self.hidden_dropout_prob = hidden_act, hidden_dropout_prob
    self.attention_probs_dropout_prob, self.layer_norm_eps = attention_probs_dropout_prob, layer_norm_eps
    self.image_size, self.patch_size, self.num_channels = image_size, patch_size, num_channels
    self.initializer_range = initializer_range


def sincos_2d(dim: int, grid: int) -> np.ndarray:
  """[grid * grid, dim] for row-major patches: first half of the channels the column, second
  the row, each [sin(p w_k), cos(p w_k)] with w_k = 10000^(-k / (dim / 4))."""
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
  rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64),
                           indexing="ij")

  def half(p):
    out = p.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  return np.concatenate([half(cols), half(rows)], axis=1).astype(np.float32)


class Data2Vec2VisionEmbeddings(nn.Module):
  def __init__(self, config):
    super().__init__()
    p, d = config.patch_size, config.hidden_size
    self.grid = config.image_size // p
    self.patch_embeddings = nn.Module()
    self.patch_embeddings.projection = nn.Conv2d(config.num_channels, d, kernel_size=p, stride=p)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
    self.register_buffer("positions", torch.from_numpy(sincos_2d(d, self.grid))[None],
                         persistent=False)
    self.layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
    self.dropout = nn.Dropout(config.hidden_dropout_prob)

  def forward(self, pixel_values):
    x = self.patch_embeddings.projection(pixel_values).flatten(2).transpose(1, 2)
    x = x + self.positions.to(x.dtype)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
    return self.dropout(self.layer_norm(x))


class Data2Vec2VisionModel(PreTrainedModel):
  config_class = Data2Vec2VisionConfig
  base_model_prefix = "data2vec2_vision"
  main_input_name = "pixel_values"

  def __init__(self, config):
    super().__init__(config)
    self.embeddings = Data2Vec2VisionEmbeddings(config)
    self.encoder = BertEncoder(config)
    self.post_init()

  def _init_weights(self, module):
    if isinstance(module, (nn.Linear, nn.Conv2d)):
      module.weight.data.normal_(0.0, self.config.initializer_range)
      if module.bias is not None:
        module.bias.data.zero_()
    elif isinstance(module, nn.LayerNorm):
      module.weight.data.fill_(1.0)
      module.bias.data.zero_()

  def forward(self, pixel_values, output_hidden_states=None, return_dict=None):
    return_dict = self.config.use_return_dict if return_dict is None else return_dict
    out = self.encoder(self.embeddings(pixel_values), output_hidden_states=output_hidden_states,
                       return_dict=True)
    x = out.last_hidden_state
    if not return_dict:
      return (x, x[:, 0]) + ((out.hidden_states,) if output_hidden_states else ())
    return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=x[:, 0],
                                      hidden_states=out.hidden_states)
