"""Helpers shared by the Hugging Face parity tests (tests/test_hf_*.py)."""

from __future__ import annotations

import numpy as np

SENTENCES = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "And God said, Let there be light: and there was light.",
    "And God saw the light, that it was good: and God divided the light from the darkness.",
]


def perturb_(model, seed: int = 0, scale: float = 0.05) -> None:
  """Adds N(0, scale) noise to every torch parameter in place.

  HF init leaves biases at 0 and LayerNorms at 1/0; a map that swaps or drops them would still
  pass a parity test on a freshly initialised model, so parity tests perturb everything.
  """
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=g) * scale)


def torch_state(model) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}


def max_abs(a, b, valid=None) -> float:
  """max |a - b| over positions where `valid` ([B, T] bool, broadcast over features) holds."""
  d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
  if valid is not None:
    d = d[np.asarray(valid, bool)]
  return float(d.max())


def train_tiny_bpe(out_dir: str, vocab_size: int = 300):
  """Trains a byte-level BPE with RoBERTa special tokens (<s>=0, <pad>=1, </s>=2) on SENTENCES
  and save_pretrained()s it as a RobertaTokenizerFast into out_dir; returns the tokenizer."""
  from tokenizers import ByteLevelBPETokenizer
  from tokenizers.processors import RobertaProcessing
  from transformers import RobertaTokenizerFast
  bpe = ByteLevelBPETokenizer()
  bpe.train_from_iterator(SENTENCES * 4, vocab_size=vocab_size, min_frequency=1, show_progress=False,
                          special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
  bpe.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0))
  tok = RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                             sep_token="</s>", cls_token="<s>", pad_token="<pad>", unk_token="<unk>",
                             mask_token="<mask>")
  tok.save_pretrained(out_dir)
  return tok
