"""Bring-your-own inputs for tests: a published-style BERT tokenizer directory (WordPiece,
[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, padding and truncation switched on in its
tokenizer.json) and a random-init Data2VecText directory with a BERT vocabulary."""

from __future__ import annotations

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4


def bert_tokenizer(lines, out_dir: str, vocab_size: int = 2000, pad_to: int | None = 128):
  """Trains a lower-casing WordPiece on `lines` and save_pretrained()s it as a
  BertTokenizerFast into out_dir, with padding to and truncation at `pad_to` switched on in
  tokenizer.json (as many published tokenizers ship). Returns the tokenizer."""
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
  from transformers import BertTokenizerFast
  tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece()
  tok.train_from_iterator(lines, trainers.WordPieceTrainer(
      vocab_size=vocab_size, special_tokens=list(BERT_SPECIALS), show_progress=False))
  cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
      special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
  if pad_to:
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=pad_to)
    tok.enable_truncation(max_length=pad_to)
  hf = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                         cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
  hf.save_pretrained(out_dir)
  return hf


def data2vec_text_dir(out_dir: str, lines, *, layers: int = 3, hidden: int = 96, heads: int = 4,
                      mlp: int = 160, max_positions: int = 40, vocab_size: int = 300,
                      seed: int = 0):
  """A perturbed random-init Data2VecTextModel with a BERT WordPiece vocabulary (pad id 0, one
  token type, bos/eos = [CLS]/[SEP]) and its tokenizer, saved into out_dir. Returns
  (model, tokenizer)."""
  import torch
  from transformers import Data2VecTextConfig, Data2VecTextModel

  from hf_utils import perturb_
  tok = bert_tokenizer(lines, out_dir, vocab_size=vocab_size, pad_to=max_positions - 1)
  cfg = Data2VecTextConfig(
      vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
      intermediate_size=mlp, max_position_embeddings=max_positions, type_vocab_size=1,
      pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
      layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  torch.manual_seed(seed)
  model = Data2VecTextModel(cfg).eval()
  perturb_(model, seed=seed)
  model.save_pretrained(out_dir)
  return model, tok
