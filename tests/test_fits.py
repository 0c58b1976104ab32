"""`fit=<topology>` (d2v_jax/fits.py): the measured per-slice choices, what they set, that they
agree with the compiled rows of docs/scale.jsonl, and that the text and vision base v2 choices
compile for a v5e-8 and fit its HBM."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib

import pytest
from absl import flags

from d2v_jax import compile as C, config as config_lib, fits, resolve

ROOT = pathlib.Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -r requirements-tpu.txt)")


def _cfg(spec, *args):
  cfg = config_lib.parse_argv(["prog", "--config", spec, *args], flags.FlagValues()).config
  if cfg.modality == "text":
    cfg.model.vocab_size = 50265
  resolve.resolve(cfg)
  return cfg


MEASURED = [("text", "v2"), ("vision", "v2")]   # base recipes with a choice for both slices


def test_base_recipes_have_a_choice_for_both_slices():
  for modality, objective in MEASURED:
    for topology in ("v5e-8", "v5p-8"):
      remat, per_device = fits.FITS[(modality, "base", objective, topology)]
      assert remat in ("none", "full") and per_device >= 1


def test_fits_agree_with_the_compiled_rows():
  """Every FITS entry is a kind="fit" row of docs/scale.jsonl that fitted, and vice versa."""
  rows = [json.loads(line) for line in open(ROOT / "docs/scale.jsonl")]
  measured = {}
  for row in rows:
    if row.get("kind") == "fit" and row.get("report"):
      modality, variant = row["entry"].split(":", 1)
      k = fits.key(modality, variant.removesuffix(",v2"), variant.endswith(",v2"), row["topology"])
      measured[k] = (row["remat"], row["per_device"])
      assert row["report"]["fits"] and row["report"]["batch_per_device"] == row["per_device"]
      assert row["report"]["remat"] == row["remat"]
  assert measured == fits.FITS


def test_fit_sets_mesh_remat_dtype_batch_and_scales_the_rest(capsys):
  ref = _cfg("configs/vision.py:variant=base,v2")
  cfg = _cfg("configs/vision.py:variant=base,v2,fit=v5e-8")
  remat, per_device = fits.FITS[("vision", "base", "v2", "v5e-8")]
  assert (cfg.mesh.preset, cfg.model.encoder.remat, cfg.dtype) == ("fsdp", remat, "bfloat16")
  assert cfg.batch_size == 8 * per_device and cfg.scaling.reference_batch == ref.batch_size == 256
  # A choice below the recipe's batch (here made one by hand: half of it) scales lr and EMA.
  saved = dict(fits.FITS)
  try:
    fits.FITS[("vision", "base", "v2", "v5e-8")] = ("full", 16)
    half = _cfg("configs/vision.py:variant=base,v2,fit=v5e-8")
  finally:
    fits.FITS.clear()
    fits.FITS.update(saved)
  assert half.batch_size == 128 and half.scaling.recipe.lr == ref.optim.lr
  assert half.optim.lr == pytest.approx(ref.optim.lr * 0.5 ** 0.5)
  assert half.teacher.tau_end == pytest.approx(ref.teacher.tau_end ** 0.5)
  assert half.total_steps == 2 * ref.total_steps
  assert any(line.startswith("batch 128 = 0.5 x the recipe's 256")
             for line in capsys.readouterr().out.splitlines())
  # the command line still wins
  given = _cfg("configs/vision.py:variant=base,v2,fit=v5e-8", "--config.model.encoder.remat=none")
  assert given.model.encoder.remat == "none"


def test_unmeasured_fit_is_one_clear_error():
  with pytest.raises(ValueError, match=r"fit=v4-8: no measured choice for text variant=base,v2; "
                     r"measured: .*text:variant=base,v2,fit=v5e-8"):
    config_lib.load_file("configs/text.py:variant=base,v2,fit=v4-8")
  with pytest.raises(ValueError, match="no measured choice for vision variant=tiny,runlocal"):
    config_lib.load_file("configs/vision.py:runlocal,fit=v5e-8")


def test_oom_advice_names_the_fit_choice():
  cfg = config_lib.load_file("configs/text.py:variant=base,v2")
  cfg.model.encoder.remat, cfg.mesh.preset = "full", "fsdp"
  advice = C.oom_advice(cfg, C.parse_topology("v5e-8"))
  assert "fit=v5e-8" in advice and "remat=full" not in advice


# The text row's libtpu compile takes 6-12 minutes on 2 CPU cores (vision: 3-6), more than the
# suite's budget allows for one test: CI compiles the vision row; D2V_HEAVY_COMPILE=1 adds text.
HEAVY = os.environ.get("D2V_HEAVY_COMPILE") == "1"


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("modality", [
    pytest.param("text", marks=pytest.mark.skipif(not HEAVY, reason="set D2V_HEAVY_COMPILE=1 "
                                                  "(a 6-12 minute libtpu compile)")),
    "vision"])
def test_base_v2_fit_compiles_for_v5e_8(modality, capsys):
  """The fit=v5e-8 choice of the base v2 recipe compiles for a TPU v5e-8 and fits its HBM
  (exit 0), on the mesh and batch the choice names (measured: text 729 s, vision 372 s on 2
  loaded cores)."""
  remat, per_device = fits.FITS[(modality, "base", "v2", "v5e-8")]
  argv = ["compile", "--config", f"configs/{modality}.py:variant=base,v2,fit=v5e-8",
          "--topology", "v5e-8"]
  if modality == "text":
    argv.append("--config.model.vocab_size=50265")
  assert C.main(argv) == C.EXIT_OK
  out = capsys.readouterr().out
  assert "[tpu]" in out and "-> fits" in out
  assert f"remat={remat}" in out and f"= {per_device} per batch shard" in out
  assert "'fsdp': 8" in out
