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
from d2v_jax.models.visible import gather_tokens

# The attention bias kind (transformer.BIAS_KINDS) this embedder returns: key padding.
# The trainer's start-up line names the attention implementation chosen for it.
ATTENTION_BIAS = "padding"


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

  def setup(self):
    self.word = self._embed("word", self.vocab_size)
    self.position = self._embed("position", self.max_positions)
    self.token_type = self._embed("token_type", self.type_vocab)
    self.norm = layer_norm(self.eps, "norm", self.dtype)
    self.drop = nn.Dropout(self.dropout)

  def local(self, batch, *, student: bool = False, deterministic: bool = True):
    """Embeddings after LayerNorm and dropout -> (x [B, T, D], valid [B, T]). The student of
    data2vec 1.0 reads the masked ids; everyone else (teacher, data2vec 2.0) the originals."""
    ids = batch["student"] if student else batch["source"]
    valid = ids != self.pad_id
    x = self.word(ids) + self.position(position_ids(ids, self.pad_id))
    x = x + self.token_type(jnp.zeros_like(ids))
    x = self.drop(self.norm(x), deterministic=deterministic)
    return constrain(x, "act_batch", "act_length", "act_embed"), valid

  def __call__(self, batch, *, student: bool, deterministic: bool):
    x, valid = self.local(batch, student=student, deterministic=deterministic)
    return x, valid, padding_bias(valid)

  def context(self, x, valid, *, deterministic: bool = True):
    """data2vec 2.0 teacher input: the student's embeddings as they are (fairseq text). No
    `mask`: text masks ids before embedding, so a 1.0 student cannot share these features."""
    del deterministic
    return x, valid, padding_bias(valid)

  def visible(self, x, valid, mask, visible, *, deterministic: bool):
    """data2vec 2.0 student: keep the K visible tokens (positions are already embedded)."""
    del mask, deterministic
    x, valid = gather_tokens(x, visible), gather_tokens(valid, visible)
    return x, valid, padding_bias(valid)


def build(cfg) -> TextEmbed:
  m = cfg.model
  return TextEmbed(vocab_size=m.vocab_size, hidden=m.encoder.hidden, max_positions=m.max_positions,
                   pad_id=m.pad_id, type_vocab=m.type_vocab, eps=m.encoder.layer_norm_eps,
                   dropout=m.embed_dropout, dtype=jnp.dtype(cfg.dtype))
