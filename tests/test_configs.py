"""Config arguments: `runlocal` alone is a laptop-sized run (the tiny variant) for every
modality, as the config docstrings say; an explicit variant still wins."""
import os

import pytest

from d2v_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _encoder(modality: str, arg: str):
  return config_lib.load_file(os.path.join(ROOT, "configs", f"{modality}.py:{arg}")).model.encoder


@pytest.mark.parametrize("modality", ["text", "vision", "audio"])
def test_runlocal_alone_is_the_tiny_variant(modality):
  alone = _encoder(modality, "runlocal")
  tiny = _encoder(modality, "variant=tiny,runlocal")
  base = _encoder(modality, "variant=base,runlocal")
  assert (alone.num_layers, alone.hidden) == (tiny.num_layers, tiny.hidden)
  assert alone.hidden < base.hidden and alone.num_layers < base.num_layers
  assert (base.num_layers, base.hidden) == (12, 768)
