"""Smoke: the tiny audio config trains on real speech (Asterisk prompts), resumes, exports."""

from __future__ import annotations

import os

import numpy as np
import pytest

from d2v_jax import config as config_lib, metrics, train
from conftest import ROOT

PROMPTS = os.path.join(ROOT, "data", "audio", "prompts")


def _cfg(steps: int):
  cfg = config_lib.load_file("configs/audio.py:variant=tiny,runlocal")
  cfg.data.path = os.path.join(PROMPTS, "*.wav")
  cfg.data.max_samples = 16_000     # 1 s crops (49 frames) keep the CPU run short
  cfg.data.min_samples = 8_000
  cfg.total_steps = steps
  cfg.checkpoint_every = 20
  cfg.log_every = 5
  cfg.resume_allow_changes = "total_steps"   # the rerun test trains the run longer
  return cfg


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  if not os.path.isdir(PROMPTS) or len(os.listdir(PROMPTS)) < 100:
    pytest.skip(f"{PROMPTS} missing: run .ci/setup (Debian asterisk-core-sounds-en-g722 + ffmpeg)")
  workdir = str(tmp_path_factory.mktemp("audio_run"))
  train.run(_cfg(40), workdir)
  return workdir


def test_loss_goes_down_on_real_speech(run_dir):
  rows = metrics.read(run_dir)
  assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30, 35, 40]
  first = rows[0]["loss"]
  last = np.mean([r["loss"] for r in rows[-2:]])
  print("audio smoke loss:", [round(r["loss"], 3) for r in rows])
  assert last < 0.85 * first, (first, last)   # means over 5-step windows
  # Instance-normalised targets keep their spread whatever happens (target_var was ~0.8 here
  # with the collapsing recipe too): finite, not a collapse check.
  assert rows[-1]["target_var"] > 0.5 and np.isfinite(rows[-1]["pred_var"])
  # The collapse shows in the targets' effective rank (docs/evaluation.md): at step 35,
  # measured 26.1 with this recipe vs 21.9 with the documented collapsing one (the teacher
  # reading the student's positional conv: teacher.ema_subtrees=("encoder",)); from 45.4 at
  # step 5 in both. The gap is still small after 35 steps: asserted > 24.
  rank = {r["step"]: r["rank_target"] for r in rows if "rank_target" in r}
  assert rank[5] == pytest.approx(45.4, abs=1.0) and rank[35] > 24.0, rank


def test_rerun_resumes_at_the_saved_step(run_dir, capsys):
  train.run(_cfg(45), run_dir)
  assert "resumed from" in capsys.readouterr().out
  assert [r["step"] for r in metrics.read(run_dir)] == [5, 10, 15, 20, 25, 30, 35, 40, 45]


def test_export_of_the_run_loads_in_transformers(run_dir, tmp_path):
  transformers = pytest.importorskip("transformers")
  from d2v_jax import export as export_lib
  out = export_lib.export(run_dir, str(tmp_path / "hf"))
  model, info = transformers.Data2VecAudioModel.from_pretrained(out, output_loading_info=True)
  assert info["missing_keys"] == [] and info["unexpected_keys"] == []
  assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
  fe = transformers.AutoFeatureExtractor.from_pretrained(out)
  assert fe.sampling_rate == 16000 and fe.do_normalize and fe.return_attention_mask
