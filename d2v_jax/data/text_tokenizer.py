"""The text tokenizer: a RoBERTa-style byte-level BPE trained on the corpus, or any HF fast
tokenizer (data.tokenizer), used as a tokenizer only (its own padding / truncation off)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

from d2v_jax.config import ConfigError

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3; <mask> is the last id


def train_tokenizer(texts, vocab_size: int, out_dir: str) -> None:
  """RoBERTa-style byte-level BPE on `texts` (iterable of str), saved as an HF fast
  tokenizer dir: <s>=0 <pad>=1 </s>=2 <unk>=3, <mask> = last id. Deterministic for a given
  corpus. Written to a temporary dir and renamed, so concurrent processes never see half."""
  # tokenizers / transformers (seconds of import) only where a tokenizer is made
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import RobertaTokenizerFast

  if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
    raise ConfigError(f"tokenizer vocab_size={vocab_size} must be >= 261 (256 bytes + 5 specials)")
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size - 1, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  tok.add_special_tokens(["<mask>"])
  tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
  hf = RobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            sep_token="</s>", cls_token="<s>", unk_token="<unk>",
                            pad_token="<pad>", mask_token="<mask>", add_prefix_space=False,
                            model_max_length=1_000_000)
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tokenizer.", dir=parent)
  hf.save_pretrained(tmp)
  os.chmod(tmp, 0o755)  # mkdtemp makes it private
  try:
    os.rename(tmp, out_dir)
  except OSError:  # another process got there first (same corpus -> same tokenizer)
    shutil.rmtree(tmp, ignore_errors=True)
    if not os.path.isdir(out_dir):
      raise


def load_tokenizer(path: str):
  # (see train_tokenizer: import cost)
  from transformers import AutoTokenizer
  if not os.path.isdir(path):
    raise ConfigError(f"data.tokenizer={path!r} is not a directory; give an HF tokenizer "
                      "directory (tokenizer.json or vocab files), or leave it empty to train one")
  try:
    return AutoTokenizer.from_pretrained(path, use_fast=True)
  except Exception as e:   # transformers raises many types (OSError, ValueError, AttributeError...)
    text = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(f"data.tokenizer={path!r} cannot be loaded as an HF tokenizer "
                      f"({type(e).__name__}: {text}); give an HF tokenizer directory") from None


def corpus_encoder(tok):
  """A copy of tok's Rust tokenizer with padding and truncation off (a published
  tokenizer.json often pads and truncates every encoding to 128 or 512 tokens)."""
  # (see train_tokenizer: import cost)
  from tokenizers import Tokenizer
  backend = getattr(tok, "backend_tokenizer", None)
  if backend is None:
    raise ConfigError(f"tokenizer {tok.name_or_path!r} is not a fast tokenizer (no "
                      "tokenizer.json); save it with a `tokenizers` backend")
  backend = Tokenizer.from_str(backend.to_str())
  backend.no_padding()
  backend.no_truncation()
  return backend


def tokenizer_hash(tok) -> str:
  path = tok.name_or_path
  h = hashlib.sha256(type(tok).__name__.encode())
  if os.path.isdir(path):
    for name in sorted(os.listdir(path)):
      h.update(name.encode())
      with open(os.path.join(path, name), "rb") as f:
        h.update(f.read())
  else:
    h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
  return h.hexdigest()


def bos_eos(tok) -> tuple[int, int]:
  """Block delimiters: the tokenizer's bos / eos (RoBERTa <s> / </s>), else its cls / sep
  (BERT [CLS] / [SEP])."""
  bos = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
  eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
  if bos is None or eos is None:
    raise ConfigError(f"tokenizer {tok.name_or_path!r} has neither bos/eos nor cls/sep tokens "
                      "(<s> </s> or [CLS] [SEP]); blocks need both delimiters")
  return bos, eos


def special_ids(tok) -> dict:
  """The tokenizer's own special ids (what the export's config.json carries)."""
  bos, eos = bos_eos(tok)
  return {"bos": bos, "eos": eos, "pad": tok.pad_token_id, "mask": tok.mask_token_id,
          "unk": tok.unk_token_id}
