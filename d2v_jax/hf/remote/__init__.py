"""Modeling files an export copies next to the weights when no transformers class holds the
model (loaded with `trust_remote_code=True`): data2vec 2.0 audio with ALiBi, and fairseq's
data2vec 2.0 ViT. They are written for PyTorch + transformers and never imported by d2v_jax
(which neither trains with torch nor needs it here); tests/test_fairseq_io.py loads each
export and checks it against fairseq's own model.
"""

import os

DIR = os.path.dirname(os.path.abspath(__file__))


def path(name: str) -> str:
  return os.path.join(DIR, name)
