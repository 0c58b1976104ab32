"""fairseq's own data2vec code (1.0 and 2.0) importable in this environment, for the parity tests.

The reference is the PyPI sdist fairseq-fixed==0.12.3.1, unpacked by .ci/ref/fairseq.sh under
.cache/fairseq/ (never in git). Importing it on Python 3.11 with our CPU torch takes four
workarounds, all applied here and nowhere else (the package never imports fairseq):

* paths: the sdist root goes first on sys.path (`fairseq`, `examples`), its inner `fairseq/`
  (where `examples.data2vec` lives) *after* the standard library, because it holds a
  `logging` package that would shadow the standard one;
* dataclasses: Python 3.11 refuses an unhashable dataclass instance as a field default, which
  fairseq's configs use throughout (D2vDecoderConfig, TransformerConfig, ...): while fairseq
  is imported, every new dataclass gets identity hashing;
* modules fairseq imports but never runs in a model forward (torchvision, torchaudio,
  bitarray, sacrebleu, timm.data: its datasets' augmentations) are empty stand-ins; sacrebleu
  reports 1.5 so fairseq takes its
  built-in tokenizer list;
* timm: a faithful shim of the four pieces the data2vec models use (`Mlp`, `DropPath`,
  `PatchEmbed`, `to_2tuple`), written from timm's definitions (parameter names fc1 / fc2 /
  proj as timm's, so state dicts match). numpy 2 lost `np.float`, which fairseq's MAE sin-cos
  table uses: it is aliased to float.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.abc
import importlib.machinery
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("D2V_FAIRSEQ_SRC") or os.path.join(ROOT, ".cache", "fairseq")
STUBBED = ("torchvision", "torchaudio", "bitarray", "sacrebleu")


def source_dir() -> str | None:
  """The unpacked sdist, or None when .ci/setup has not fetched it."""
  found = sorted(glob.glob(os.path.join(CACHE, "fairseq_fixed-*")))
  found = [d for d in found if os.path.isfile(os.path.join(d, "fairseq", "examples", "data2vec",
                                                           "models", "data2vec2.py"))]
  return found[-1] if found else None


class _Anything:
  """Stand-in for any attribute of a stubbed module (classes, functions, constants)."""

  def __init__(self, *a, **k):
    pass

  def __call__(self, *a, **k):
    return _Anything()


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  def find_spec(self, name, path, target=None):
    if name.split(".")[0] in STUBBED or name == "timm.data" or name.startswith("timm.data."):
      return importlib.machinery.ModuleSpec(name, self, is_package=True)
    return None

  def create_module(self, spec):
    mod = types.ModuleType(spec.name)
    mod.__path__ = []
    mod.__version__ = "1.5.0"

    def attr(name):
      if name.startswith("__"):
        raise AttributeError(name)
      return _Anything
    mod.__getattr__ = attr
    return mod

  def exec_module(self, module):
    pass


def _timm_shim(torch):
  nn = torch.nn

  def to_2tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)

  class Mlp(nn.Module):
    """timm Mlp: fc1 -> act -> dropout -> fc2 -> dropout."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU,
                 drop=0.0, **_):
      super().__init__()
      hidden_features = hidden_features or in_features
      self.fc1 = nn.Linear(in_features, hidden_features)
      self.act = act_layer()
      self.drop1 = nn.Dropout(drop)
      self.fc2 = nn.Linear(hidden_features, out_features or in_features)
      self.drop2 = nn.Dropout(drop)

    def forward(self, x):
      return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))

  class DropPath(nn.Module):
    """timm DropPath: per-sample stochastic depth, rescaled by 1 / keep."""

    def __init__(self, drop_prob=0.0, scale_by_keep=True):
      super().__init__()
      self.drop_prob, self.scale_by_keep = drop_prob, scale_by_keep

    def forward(self, x):
      if self.drop_prob == 0.0 or not self.training:
        return x
      keep = 1 - self.drop_prob
      mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
      return x * mask / keep if self.scale_by_keep else x * mask

  class PatchEmbed(nn.Module):
    """timm PatchEmbed: a stride-p conv, flattened to [B, N, D]."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, **_):
      super().__init__()
      self.img_size, self.patch_size = to_2tuple(img_size), to_2tuple(patch_size)
      self.grid_size = tuple(i // p for i, p in zip(self.img_size, self.patch_size))
      self.num_patches = self.grid_size[0] * self.grid_size[1]
      self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size,
                            stride=self.patch_size)

    def forward(self, x):
      return self.proj(x).flatten(2).transpose(1, 2)

  class Unused(nn.Module):
    def __init__(self, *a, **k):
      raise NotImplementedError("not part of the timm shim (tests/fairseq_ref.py)")

  mods = {}
  for name in ("timm", "timm.models", "timm.models.layers", "timm.models.vision_transformer"):
    mods[name] = types.ModuleType(name)
    mods[name].__path__ = []
    mods[name].__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
  vt = mods["timm.models.vision_transformer"]
  vt.Mlp, vt.DropPath, vt.PatchEmbed, vt.Block, vt.Attention = Mlp, DropPath, PatchEmbed, Unused, Unused
  mods["timm.models.layers"].to_2tuple = to_2tuple
  mods["timm.models.layers"].DropPath = DropPath
  sys.modules.update(mods)


def _hashable_dataclasses():
  """dataclasses.dataclass that gives every new class identity hashing (restored by the caller)."""
  original = dataclasses.dataclass

  def patched(cls=None, **kw):
    def wrap(c):
      c = original(c, **kw)
      if c.__hash__ is None:
        c.__hash__ = object.__hash__
      return c
    return wrap if cls is None else wrap(cls)
  return original, patched


_LOADED: types.SimpleNamespace | None = None


def load() -> types.SimpleNamespace:
  """Imports fairseq and its data2vec models once per process. Raises RuntimeError when the
  sdist is absent (the tests skip with that reason)."""
  global _LOADED
  if _LOADED is not None:
    return _LOADED
  src = source_dir()
  if src is None:
    raise RuntimeError(f"fairseq reference missing under {CACHE}: run bash .ci/setup "
                       "(.ci/ref/fairseq.sh fetches the fairseq-fixed sdist)")
  import numpy as np
  import torch
  # transformers records at its first import which optional packages exist: before the
  # stand-ins below, so it never takes them for real torchvision / timm.
  import transformers  # noqa: F401
  if not hasattr(np, "float"):
    np.float = float   # numpy 2 removed it; fairseq's MAE sin-cos table uses it
  sys.path.insert(0, src)
  sys.path.append(os.path.join(src, "fairseq"))
  sys.meta_path.insert(0, _StubFinder())
  _timm_shim(torch)
  original, patched = _hashable_dataclasses()
  dataclasses.dataclass = patched
  try:
    import fairseq  # noqa: F401
    from fairseq.data import Dictionary
    from examples.data2vec.data.modality import Modality
    from examples.data2vec.models import data2vec2, data2vec_audio, data2vec_text, data2vec_vision
    from examples.data2vec.models.modalities import audio, base, images, modules, text
  finally:
    dataclasses.dataclass = original
  _LOADED = types.SimpleNamespace(
      src=src, torch=torch, Dictionary=Dictionary, Modality=Modality, data2vec2=data2vec2,
      data2vec_text=data2vec_text, data2vec_audio=data2vec_audio, data2vec_vision=data2vec_vision,
      modalities=types.SimpleNamespace(audio=audio, base=base, images=images, modules=modules,
                                       text=text))
  return _LOADED
