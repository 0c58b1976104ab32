"""Config arguments: `runlocal` alone is a laptop-sized run (the tiny variant) for every
modality, as the config docstrings say; an explicit variant still wins."""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _get_config(modality: str, arg: str):
  spec = importlib.util.spec_from_file_location(f"cfg_{modality}",
                                                os.path.join(ROOT, "configs", f"{modality}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


@pytest.mark.parametrize("modality", ["text", "vision", "audio"])
def test_runlocal_alone_is_the_tiny_variant(modality):
  alone = _get_config(modality, "runlocal").model.encoder
  tiny = _get_config(modality, "variant=tiny,runlocal").model.encoder
  base = _get_config(modality, "variant=base,runlocal").model.encoder
  assert (alone.num_layers, alone.hidden) == (tiny.num_layers, tiny.hidden)
  assert alone.hidden < base.hidden and alone.num_layers < base.num_layers
  assert (base.num_layers, base.hidden) == (12, 768)
