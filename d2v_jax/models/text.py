"""RoBERTa embeddings for data2vec-text.

Token + learned position (offset from the padding index, as fairseq / HF
`create_position_ids_from_input_ids`) + token-type embedding, then LayerNorm and dropout.
The student reads the masked ids (`batch["student"]`), the teacher the original ids
(`batch["source"]`); the teacher shares these parameters with the student (fairseq text).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from d2v_jax.models.transformer import INIT, constrain, layer_norm, padding_bias


def position_ids(ids, pad_id: int):
  """First real token gets pad_id + 1; padding keeps pad_id (HF / fairseq convention)."""
  valid = (ids != pad_id).astype(jnp.int32)
  return jnp.cumsum(valid, axis=1) * valid + pad_id


class TextEmbed(nn.Module):
  vocab_size: int
  hidden: int
  max_positions: int
  pad_id: int
  type_vocab: int = 1
  eps: float = 1e-5
  dropout: float = 0.1
  dtype: Any = jnp.float32
  num_extra_tokens: int = 0   # positions in front of the sequence that are never targets

  def _embed(self, name: str, n: int):
    return nn.Embed(n, self.hidden, dtype=self.dtype, param_dtype=jnp.float32, name=name,
                    embedding_init=nn.with_logical_partitioning(INIT, ("vocab", "embed")))

  @nn.compact
  def __call__(self, batch, *, student: bool, deterministic: bool):
    ids = batch["student"] if student else batch["source"]
    valid = ids != self.pad_id
    x = self._embed("word", self.vocab_size)(ids)
    x = x + self._embed("position", self.max_positions)(position_ids(ids, self.pad_id))
    x = x + self._embed("token_type", self.type_vocab)(jnp.zeros_like(ids))
    x = layer_norm(self.eps, "norm", self.dtype)(x)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    return constrain(x, "act_batch", "act_length", "act_embed"), valid, padding_bias(valid)


def build(cfg) -> TextEmbed:
  m = cfg.model
  return TextEmbed(vocab_size=m.vocab_size, hidden=m.encoder.hidden, max_positions=m.max_positions,
                   pad_id=m.pad_id, type_vocab=m.type_vocab, eps=m.encoder.layer_norm_eps,
                   dropout=m.embed_dropout, dtype=jnp.dtype(cfg.dtype))
