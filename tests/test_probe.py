"""Probes: separable features reach ~100 %, shuffled labels stay at chance; loaders' eval
preprocessing on hand-checkable inputs; the CLI end to end on a random-init text run."""

import json
import wave

import numpy as np
import pytest

from d2v_jax import config as config_lib
from d2v_jax.data import text_tokenizer
from d2v_jax.data import audio, labelled, vision
from d2v_jax.probe import cli as probe_cli, features, fit
from d2v_jax.config import ConfigError


def _blobs(n_per_class=150, classes=4, dim=16, seed=0):
  """Gaussian blobs with unit noise around centres 6 apart: linearly separable w.p. ~1."""
  rng = np.random.default_rng(seed)
  centres = 6.0 * np.eye(classes, dim)
  y = np.repeat(np.arange(classes), n_per_class).astype(np.int32)
  x = centres[y] + rng.normal(size=(len(y), dim))
  return x, y


def test_probe_on_separable_features_is_near_perfect():
  x, y = _blobs()
  res = fit.fit_probes(x, y, seed=0, test_frac=0.3)
  assert res["n_test"] == 180 and res["n_train"] == 420
  assert res["linear_acc"] >= 0.98
  assert res["knn_acc"] >= 0.98
  assert res["chance"] == pytest.approx(0.25)  # stratified: 45 of each class in the test split


def test_probe_on_shuffled_labels_stays_at_chance():
  # 4 balanced classes, 180 test examples: accuracy of a label-blind classifier is
  # Binomial(180, 1/4) / 180, std 0.032; the band [0.15, 0.35] is about 3 std either side.
  x, y = _blobs()
  accs = []
  for seed in range(3):
    y_shuffled = np.random.default_rng(100 + seed).permutation(y)
    res = fit.fit_probes(x, y_shuffled, seed=seed, test_frac=0.3)
    assert 0.15 <= res["linear_acc"] <= 0.35, res
    assert 0.15 <= res["knn_acc"] <= 0.35, res
    accs += [res["linear_acc"], res["knn_acc"]]
  assert abs(np.mean(accs) - 0.25) < 0.06


def test_split_is_stratified_and_seeded():
  y = np.array([0] * 70 + [1] * 30, np.int32)
  tr, te = fit.split(y, 0.3, seed=3)
  assert len(te) == 30 and np.bincount(y[te]).tolist() == [21, 9]
  tr2, te2 = fit.split(y, 0.3, seed=3)
  np.testing.assert_array_equal(te, te2)
  assert not set(tr) & set(te)
  with pytest.raises(ConfigError, match="at least 2 examples"):
    fit.split(np.array([0, 0, 0, 1], np.int32), 0.3, 0)


def test_layer_index():
  assert features.layer_index(-1, 4) == 3 and features.layer_index(1, 4) == 0
  assert features.layer_index(-4, 4) == 0 and features.layer_index(4, 4) == 3
  for bad in (0, 5, -5):
    with pytest.raises(ConfigError, match="layer="):
      features.layer_index(bad, 4)


def test_read_tsv_and_class_folders_errors(tmp_path):
  p = tmp_path / "x.tsv"
  p.write_text("a verse\tOT\n\nanother verse\tNT\nno label here\n")
  with pytest.raises(ConfigError, match=r"x.tsv:4: expected `text<TAB>label`"):
    labelled.read_tsv(str(p))
  p.write_text("a verse\tOT\nanother\tverse\tNT\n")
  assert labelled.read_tsv(str(p)) == (["a verse", "another\tverse"], ["OT", "NT"])
  (tmp_path / "imgs" / "cat").mkdir(parents=True)
  (tmp_path / "imgs" / "cat" / "a.png").write_bytes(b"x")
  with pytest.raises(ConfigError, match="at least two class folders"):
    labelled.class_folders(str(tmp_path / "imgs"), (".png",))


def test_load_image_eval_preprocessing(tmp_path):
  from PIL import Image
  cfg = config_lib.load_file("configs/vision.py:variant=tiny,runlocal")
  # a 100x50 image: left half red, right half blue. Shorter side 50 -> 64, so 128x64, and the
  # centre 64x64 crop keeps columns 32..95: left half red, right half blue.
  img = np.zeros((50, 100, 3), np.uint8)
  img[:, :50, 0] = 255
  img[:, 50:, 2] = 255
  Image.fromarray(img).save(tmp_path / "a.png")
  x = vision.load_image(str(tmp_path / "a.png"), cfg)
  assert x.shape == (64, 64, 3)
  mean, std = np.array(cfg.data.mean), np.array(cfg.data.std)
  np.testing.assert_allclose(x[10, 5], (np.array([1, 0, 0]) - mean) / std, atol=1e-4)
  np.testing.assert_allclose(x[10, 60], (np.array([0, 0, 1]) - mean) / std, atol=1e-4)


def test_load_clip_normalises_then_cuts_and_pads(tmp_path):
  cfg = config_lib.load_file("configs/audio.py:variant=tiny,runlocal")
  rate, n = cfg.data.sample_rate, 40_000  # longer than max_samples = 32,000
  t = np.arange(n)
  x = (8000 * np.sin(2 * np.pi * 440 * t / rate) + 3000).astype(np.int16)
  path = tmp_path / "a.wav"
  with wave.open(str(path), "wb") as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(rate)
    w.writeframes(x.tobytes())
  clip, length = audio.load_clip(str(path), cfg)
  assert length == cfg.data.max_samples and clip.shape == (cfg.data.max_samples,)
  # normalised over the whole utterance (before the cut), as training does
  f = x.astype(np.float64) / 32768
  want = (f - f.mean()) / np.sqrt(f.var() + 1e-5)
  np.testing.assert_allclose(clip, want[:cfg.data.max_samples], atol=1e-3)
  # a short clip is zero-padded and its length reported
  with wave.open(str(path), "wb") as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(rate)
    w.writeframes(x[:20_000].tobytes())
  clip, length = audio.load_clip(str(path), cfg)
  assert length == 20_000 and np.all(clip[20_000:] == 0) and np.abs(clip[:20_000]).max() > 1


FRUIT = "apple orange banana grape melon lemon cherry peach plum pear".split()
LAND = "river mountain forest valley ocean desert island canyon meadow lake".split()


def test_cli_random_init_text_run(tmp_path, capsys):
  """A run directory with only config.json + tokenizer (no checkpoint): --random-init probes
  the run's architecture; words of the two classes are disjoint, so the features separate them."""
  from d2v_jax.data import text as text_data
  from step_utils import tiny_text_config
  rng = np.random.default_rng(0)
  rows = [(" ".join(rng.choice(FRUIT if i % 2 else LAND, size=5)), "fruit" if i % 2 else "land")
          for i in range(60)]
  tsv = tmp_path / "p.tsv"
  tsv.write_text("".join(f"{t}\t{y}\n" for t, y in rows))
  run = tmp_path / "run"
  text_tokenizer.train_tokenizer([t for t, _ in rows] * 5, 300, str(run / "tokenizer"))
  cfg = tiny_text_config()
  cfg.model.vocab_size = len(text_data.load_tokenizer(str(run / "tokenizer")))
  config_lib.write_resolved(cfg, str(run))
  out = tmp_path / "probe.json"
  probe_cli.main(["--workdir", str(run), "--data", str(tsv), "--random-init", "--k", "5",
              "--repeats", "2", "--out", str(out)])
  table = capsys.readouterr().out
  assert "random-init" in table and "2 classes, train 42 / test 18" in table
  res = json.loads(out.read_text())
  assert res["layer"] == 2 and res["num_layers"] == 2 and res["classes"] == ["fruit", "land"]
  assert res["split_seeds"] == [0, 1]
  (row,) = res["rows"]
  assert row["weights"] == "random-init" and row["n_test"] == 18 and len(row["splits"]) == 2
  assert row["linear_acc"] == pytest.approx(np.mean([s["linear_acc"] for s in row["splits"]]))
  assert row["linear_acc"] >= 0.9 and row["knn_acc"] >= 0.9
  assert 1.0 < row["effective_rank"] <= 64.0
  # without a checkpoint, probing the run's weights is one clear error
  with pytest.raises(SystemExit):
    probe_cli.main(["--workdir", str(run), "--data", str(tsv)])
  assert "error:" in capsys.readouterr().err
