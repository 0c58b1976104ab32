"""Smoke: the tiny vision config on real photos (data/vision/photos), resume, export, CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from d2v_jax import config as config_lib, export as export_lib, metrics, train
from conftest import ROOT

PHOTOS = os.path.join(ROOT, "data", "vision", "photos")


@pytest.fixture(scope="module")
def photos():
  if not os.path.isdir(PHOTOS) or len(os.listdir(PHOTOS)) < 10:
    pytest.skip(f"{PHOTOS} missing: run .ci/setup (.ci/data/vision.sh writes the photos)")
  return PHOTOS


SPEC = "configs/vision.py:variant=tiny,runlocal"
# Short schedule for 30-40 steps (the runlocal config is for a few hundred).
OVERRIDES = {"checkpoint_every": 15, "log_every": 5, "optim.warmup_steps": 5, "optim.lr": 2e-3}


def _cli(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "d2v_jax.train", *args], cwd=ROOT,
                        capture_output=True, text=True, env=env, timeout=600)


def _cfg(photos, steps):
  cfg = config_lib.load_file(os.path.join(ROOT, SPEC))
  cfg.data.path = photos
  cfg.total_steps = steps
  for key, value in OVERRIDES.items():
    node, *path = key.split(".")
    if path:
      cfg[node][path[0]] = value
    else:
      cfg[node] = value
  cfg.resume_allow_changes = "total_steps"   # the rerun test trains the run longer
  return cfg


@pytest.fixture(scope="module")
def run_dir(photos, tmp_path_factory):
  """The command of the README: python -m d2v_jax.train --config ... --config.total_steps=30."""
  workdir = str(tmp_path_factory.mktemp("vision_run"))
  r = _cli("--config", SPEC, "--workdir", workdir, "--config.total_steps=30",
           f"--config.data.path={photos}", *(f"--config.{k}={v}" for k, v in OVERRIDES.items()))
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir


def test_loss_goes_down_on_real_photos(run_dir):
  rows = metrics.read(run_dir)
  assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
  first, last = rows[0]["loss"], rows[-1]["loss"]
  assert last < 0.8 * first, (first, last)
  for r in rows:
    assert abs(r["masked_frac"] - 39 / 64) < 1e-6     # 39 of 64 patches, every image
  for key in ("lr", "tau", "grad_norm", "param_norm", "target_var", "pred_var", "examples_per_s"):
    assert np.isfinite(rows[-1][key]), key
  with open(os.path.join(run_dir, "config.json")) as f:
    resolved = json.load(f)
  assert resolved["data"]["num_mask_patches"] == 39 and resolved["modality"] == "vision"


def test_rerun_resumes_at_the_saved_step(run_dir, photos, capsys):
  train.run(_cfg(photos, 40), run_dir)
  assert "resumed from" in capsys.readouterr().out
  assert [r["step"] for r in metrics.read(run_dir)] == [5, 10, 15, 20, 25, 30, 35, 40]


def test_export_loads_in_transformers(run_dir, tmp_path):
  import torch
  from transformers import AutoImageProcessor, AutoModel
  from PIL import Image
  out = export_lib.export(run_dir, str(tmp_path / "hf"))
  model, info = AutoModel.from_pretrained(out, output_loading_info=True)
  assert type(model).__name__ == "Data2VecVisionModel"
  assert info["missing_keys"] == [] and info["unexpected_keys"] == []
  proc = AutoImageProcessor.from_pretrained(out)
  img = Image.open(os.path.join(PHOTOS, "skimage_astronaut.png")).convert("RGB")
  pix = proc(images=img, return_tensors="pt")["pixel_values"]
  assert tuple(pix.shape) == (1, 3, 64, 64)
  with torch.no_grad():
    h = model(pixel_values=pix).last_hidden_state
  assert tuple(h.shape) == (1, 65, 64) and torch.isfinite(h).all()


def test_cli_rejects_bad_mask_count(tmp_path):
  r = _cli("--config", SPEC, "--workdir", str(tmp_path), "--config.data.num_mask_patches=65")
  assert r.returncode == 2 and "num_mask_patches=65" in r.stderr and "Traceback" not in r.stderr
