"""Smoke: the tiny text config on the real KJV corpus, resume, export, and CLI errors."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from d2v_jax import config as config_lib, export as export_lib, metrics, train
from conftest import ROOT


def _cfg(kjv_path, steps):
  cfg = config_lib.load_file("configs/text.py:variant=tiny,runlocal")
  cfg.data.path = kjv_path
  cfg.data.vocab_size = 1024
  cfg.data.block_size = 64
  cfg.total_steps = steps
  cfg.checkpoint_every = 15
  cfg.log_every = 5
  cfg.optim.warmup_steps = 5
  cfg.resume_allow_changes = "total_steps"   # the rerun test trains the run longer
  return cfg


@pytest.fixture(scope="module")
def run_dir(kjv_path, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("text_run"))
  train.run(_cfg(kjv_path, 30), workdir)
  return workdir


def test_loss_goes_down_on_real_text(run_dir):
  rows = metrics.read(run_dir)
  assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
  first, last = rows[0]["loss"], rows[-1]["loss"]
  assert last < 0.8 * first, (first, last)   # means over 5-step windows
  for key in ("lr", "tau", "grad_norm", "param_norm", "target_var", "pred_var", "examples_per_s",
              "tokens_per_s"):
    assert np.isfinite(rows[-1][key]), key
  with open(os.path.join(run_dir, "config.json")) as f:
    resolved = json.load(f)
  assert resolved["model"]["vocab_size"] > 256 and resolved["total_steps"] == 30


def test_rerun_resumes_at_the_saved_step(run_dir, kjv_path, capsys):
  train.run(_cfg(kjv_path, 40), run_dir)
  out = capsys.readouterr().out
  assert "resumed from" in out and re.search(r"restoring checkpoint step \d+ of .* \.\.\.\n", out), out
  steps = [r["step"] for r in metrics.read(run_dir)]
  assert steps == [5, 10, 15, 20, 25, 30, 35, 40]   # continued at 30, nothing re-done
  assert sorted(int(d) for d in os.listdir(os.path.join(run_dir, "checkpoints"))
                if d.isdigit())[-1] == 40


def test_export_loads_in_transformers(run_dir, tmp_path):
  from transformers import AutoModel, AutoTokenizer
  out = export_lib.export(run_dir, str(tmp_path / "hf"))
  model, info = AutoModel.from_pretrained(out, output_loading_info=True)
  assert type(model).__name__ == "Data2VecTextModel"
  # Pretraining never trains a pooler, so the export has none: Data2VecTextModel reports only
  # its pooler as newly initialised, and the head classes without a pooler load with nothing
  # unexpected (tests/test_hf_heads.py).
  assert sorted(info["missing_keys"]) == ["pooler.dense.bias", "pooler.dense.weight"]
  assert info["unexpected_keys"] == [] and info["mismatched_keys"] == []
  tok = AutoTokenizer.from_pretrained(out)
  assert tok.pad_token_id == 1 and tok.mask_token_id == len(tok) - 1
  with open(os.path.join(out, "d2v_config.json")) as f:
    assert json.load(f)["modality"] == "text"
  # Exporting into a directory that holds another model is refused.
  other = tmp_path / "other"
  other.mkdir()
  (other / "config.json").write_text("{}")
  with pytest.raises(export_lib.ExportError, match="--overwrite"):
    export_lib.export(run_dir, str(other))


def _cli(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                        env=env, timeout=300)


def test_cli_rejects_unknown_key_and_wrong_type(tmp_path):
  r = _cli("d2v_jax.train", "--config", "configs/text.py:variant=tiny", "--workdir", str(tmp_path),
           "--config.optim.lrr=1")
  assert r.returncode == 2
  assert "unknown config key 'optim.lrr'" in r.stderr and "Traceback" not in r.stderr
  r = _cli("d2v_jax.train", "--config", "configs/text.py:variant=tiny", "--workdir", str(tmp_path),
           "--config.total_steps=many")
  assert r.returncode == 2 and "total_steps" in r.stderr and "Traceback" not in r.stderr
  assert os.listdir(tmp_path) == []  # nothing written for a rejected command


def test_export_of_run_without_checkpoint_fails_cleanly(tmp_path):
  r = _cli("d2v_jax.export", "--workdir", str(tmp_path), "--out", str(tmp_path / "hf"))
  assert r.returncode == 2 and "no checkpoints" in r.stderr and "Traceback" not in r.stderr
