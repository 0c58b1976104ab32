"""The modality contract (d2v_jax/modality.py) is checked where it is used: a module missing a
contract function at load time, an embedder missing what the config's objective or teacher
calls at validation time (one ConfigError line each, before anything is built)."""

from __future__ import annotations

import sys
import types

import pytest

from d2v_jax import config as config_lib, modality, validate


def _cfg(spec, **keys):
  cfg = config_lib.load_file(spec)
  for k, v in keys.items():
    config_lib.set_path(cfg, k, v)
  return cfg


def test_share_local_v1_text_is_refused_at_validation():
  cfg = _cfg("configs/text.py:variant=tiny", **{"teacher.share_local": True, "model.vocab_size": 96})
  with pytest.raises(config_lib.ConfigError, match=r"TextEmbed\.context\(\) takes no mask"):
    validate.validate(cfg)


def test_share_local_v1_vision_is_allowed():
  """fairseq's data2vec_vision port feeds its teacher the student's patch embeddings."""
  cfg = _cfg("configs/vision.py:variant=tiny", **{"teacher.share_local": True})
  validate.validate(cfg)


def test_a_2d_decoder_needs_a_patch_grid():
  cfg = _cfg("configs/audio.py:variant=tiny,v2", **{"v2.decoder.kind": "2d"})
  with pytest.raises(config_lib.ConfigError, match=r"v2.decoder.kind=2d needs a patch grid: AudioEmbed"):
    validate.validate(cfg)


def test_an_embedder_without_the_v2_methods_is_named(monkeypatch):
  import flax.linen as nn

  class Minimal(nn.Module):
    num_extra_tokens: int = 0

    def __call__(self, batch, *, student, deterministic):
      return batch["x"], None, None

  mod = modality.load("text")
  monkeypatch.setattr(mod.model, "build", lambda cfg: Minimal())
  cfg = _cfg("configs/text.py:variant=tiny,v2", **{"model.vocab_size": 96})
  with pytest.raises(config_lib.ConfigError, match=r"embedder Minimal has no local\(\)"):
    validate.validate(cfg)


def test_a_modality_package_missing_contract_functions_is_refused_at_load(monkeypatch):
  pkg, model, data = (types.ModuleType(n) for n in ("halfmod", "halfmod.model", "halfmod.data"))
  pkg.__path__ = []
  model.build = lambda cfg: None
  data.prepare = data.validate = lambda *a: None
  for name, m in (("halfmod", pkg), ("halfmod.model", model), ("halfmod.data", data)):
    monkeypatch.setitem(sys.modules, name, m)
  with pytest.raises(config_lib.ConfigError, match=r"halfmod.data lacks \['resolve_offline', "
                     r"'build_dataset', 'example_batch', 'synthetic_batch', 'labelled_set'\]"):
    modality.load("halfmod")
