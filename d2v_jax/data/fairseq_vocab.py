"""fairseq's text vocabulary (GPT-2 byte-level BPE + a fairseq dict.txt) as an HF tokenizer.

fairseq's RoBERTa / data2vec text models read ids of a fairseq Dictionary: <s>=0 <pad>=1
</s>=2 <unk>=3, then one id per dict.txt line in file order (a line's symbol is a GPT-2 BPE
id, e.g. "13 850314647"), then <mask> added by the masked-LM task. Text becomes ids in two
steps: GPT-2 BPE (encoder.json + vocab.bpe) gives GPT-2 ids, the dictionary maps them to its
own. `build(...)` writes one HF fast tokenizer doing both: the BPE's vocab.json re-keyed to the
dictionary's ids, so `--config.data.tokenizer=OUT` feeds a fairseq checkpoint the ids it was
trained on (tests/test_fairseq_io.py checks this against fairseq's own encoder on text).

  python -m d2v_jax.data fairseq-vocab --dict dict.txt --encoder encoder.json --bpe vocab.bpe --out DIR
"""

from __future__ import annotations

import json
import os

from d2v_jax.config import ConfigError
from d2v_jax.data.text_tokenizer import SPECIAL_TOKENS

FILES = ("dict.txt", "encoder.json", "vocab.bpe")


def read_dict(path: str) -> list[str]:
  """The symbols of a fairseq dict.txt, in id order after the 4 specials."""
  symbols = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      line = line.rstrip("\n")
      if not line:
        continue
      parts = line.rsplit(" ", 2)
      flags = parts[2] if len(parts) == 3 and parts[2].startswith("#fairseq:") else ""
      sym = parts[0] if len(parts) >= 2 else None
      if sym is None or (len(parts) == 3 and not flags):
        raise ConfigError(f"{path}:{n} is not a fairseq dict line ('<symbol> <count>'): {line[:60]!r}")
      symbols.append(sym)
  if not symbols:
    raise ConfigError(f"{path} holds no symbols: not a fairseq dict.txt")
  return symbols


def build(dict_txt: str, encoder_json: str, vocab_bpe: str, out_dir: str) -> int:
  """Writes the HF tokenizer to out_dir; returns its size (= the model's vocab_size)."""
  # tokenizers / transformers (seconds of import) only where a tokenizer is made
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import RobertaTokenizerFast

  for path in (dict_txt, encoder_json, vocab_bpe):
    if not os.path.isfile(path):
      raise ConfigError(f"fairseq vocabulary file {path!r} does not exist (need dict.txt, "
                        "encoder.json and vocab.bpe)")
  try:
    with open(encoder_json, encoding="utf-8") as f:
      gpt2 = json.load(f)
  except ValueError as e:
    raise ConfigError(f"{encoder_json} is not GPT-2's encoder.json ({e})") from None
  by_id = {int(i): tok for tok, i in gpt2.items()}
  vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
  for i, sym in enumerate(read_dict(dict_txt), start=len(SPECIAL_TOKENS)):
    tok = by_id.get(int(sym)) if sym.isdigit() else sym   # non-BPE symbols (madeupword0000)
    if tok is None:
      raise ConfigError(f"{dict_txt}: symbol {sym} (line {i - 3}) is not a GPT-2 id of {encoder_json}")
    vocab.setdefault(tok, i)
  mask_id = len(SPECIAL_TOKENS) + len(read_dict(dict_txt))
  vocab["<mask>"] = mask_id
  with open(vocab_bpe, encoding="utf-8") as f:
    lines = [ln.rstrip("\n") for ln in f if ln.strip() and not ln.startswith("#version")]
  # A merge whose result fairseq's dictionary lacks can never be emitted (fairseq maps it to
  # <unk>): dropping it lets the BPE stop at pieces the dictionary has.
  merges = [tuple(ln.split(" ")) for ln in lines if "".join(ln.split(" ")) in vocab]
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
  tok.add_special_tokens(["<mask>"])
  hf = RobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            sep_token="</s>", cls_token="<s>", unk_token="<unk>",
                            pad_token="<pad>", mask_token="<mask>", add_prefix_space=False,
                            model_max_length=1_000_000)
  os.makedirs(out_dir, exist_ok=True)
  hf.save_pretrained(out_dir)
  return mask_id + 1


def build_from_dir(src: str, out_dir: str) -> int:
  """`build` from a folder holding dict.txt, encoder.json and vocab.bpe (as fairseq ships them)."""
  missing = [f for f in FILES if not os.path.isfile(os.path.join(src, f))]
  if missing:
    raise ConfigError(f"fairseq vocabulary folder {src!r} lacks {missing} (needs {list(FILES)})")
  return build(*(os.path.join(src, f) for f in FILES), out_dir)
