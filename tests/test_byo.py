"""Bring your own data: one list of readable formats per modality shared by the trainer and
the probe (audio .ogg / .mp3 class folders; every image format TF decodes), alpha composited
onto data.background alike in both, and a CPU run whose console carries only our own lines."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from d2v_jax import config as config_lib, console
from d2v_jax.data import text_tokenizer
from d2v_jax.probe import cli as probe_cli
from d2v_jax.data import audio, vision
from reliability_utils import ROOT, write_corpus, write_wavs

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None,
                                  reason="ffmpeg not installed (apt-get install ffmpeg)")


# ---------------------------------------------------------------------------- audio


@pytest.fixture(scope="module")
def ogg_mp3_classes(tmp_path_factory):
  """Two class folders made by ffmpeg from 1.5 s synthetic WAVs: a/ holds .ogg, b/ .mp3."""
  if shutil.which("ffmpeg") is None:
    pytest.skip("ffmpeg not installed (apt-get install ffmpeg)")
  root = tmp_path_factory.mktemp("ogg_mp3")
  write_wavs(str(root / "wav"), n=4, seconds=1.5)
  for i in range(4):
    cls, ext = ("a", "ogg") if i % 2 else ("b", "mp3")
    (root / "classes" / cls).mkdir(parents=True, exist_ok=True)
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(root / "wav" / f"{i:02d}.wav"),
                    str(root / "classes" / cls / f"{i:02d}.{ext}")], check=True)
  return str(root)


def _audio_cfg(path: str):
  cfg = config_lib.load_file("configs/audio.py:variant=tiny,runlocal")
  cfg.data.path, cfg.batch_size = path, 4
  cfg.data.max_samples, cfg.data.min_samples = 16_000, 8_000
  if "buckets" in cfg.data:
    cfg.data.buckets = ()
  return cfg


def test_probe_and_trainer_read_ogg_and_mp3_folders(ogg_mp3_classes):
  """The probe's class folders and the trainer's file source list the same .ogg / .mp3 files
  (audio.EXTENSIONS / audio.list_files); decoded clips match the source WAVs."""
  import wave
  classes = os.path.join(ogg_mp3_classes, "classes")
  cfg = _audio_cfg(classes)
  ds = probe_cli.load_labelled(cfg, None, classes)
  want = [os.path.join(classes, "a", "01.ogg"), os.path.join(classes, "a", "03.ogg"),
          os.path.join(classes, "b", "00.mp3"), os.path.join(classes, "b", "02.mp3")]
  assert ds.names == want and ds.classes == ["a", "b"] and ds.labels.tolist() == [0, 0, 1, 1]
  assert ds.arrays["audio"].shape == (4, 16_000) and ds.arrays["audio_len"].tolist() == [16_000] * 4
  for name, clip in zip(ds.names, ds.arrays["audio"]):
    stem = os.path.splitext(os.path.basename(name))[0]
    with wave.open(os.path.join(ogg_mp3_classes, "wav", f"{stem}.wav")) as w:
      x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64)[:16_000]
    r = np.corrcoef(x, clip)[0, 1]     # lossy codecs, same signal, no offset
    assert r > 0.95, (name, r)

  assert audio.list_files(classes) == want
  idx = audio.index(cfg, None)
  assert sorted(idx["paths"]) == want
  lengths = dict(zip(idx["paths"], idx["lengths"]))
  assert [lengths[f] for f in want[:2]] == [24_000, 24_000]           # Vorbis: exact
  assert all(24_000 <= lengths[f] <= 24_000 + 1152 for f in want[2:])  # MP3: + encoder padding
  batch = next(iter(audio.build_dataset(cfg, None, start_step=0, process_index=0, process_count=1)))
  assert batch["audio"].shape == (4, 16_000) and batch["audio_len"].tolist() == [16_000] * 4
  std = batch["audio"].std(1)
  assert np.all(np.abs(std - 1.0) < 0.05), std   # normalised real audio, not silence


def test_probe_reads_every_audio_format_the_trainer_reads(tmp_path):
  """audio.EXTENSIONS (.wav .flac .ogg .mp3 .opus .m4a, made by ffmpeg from one WAV each):
  the probe's class folders list the same files as the trainer's source and its index, and
  every clip decodes to the source signal (opus resampled from 48 kHz by ffmpeg)."""
  import wave
  if shutil.which("ffmpeg") is None:
    pytest.skip("ffmpeg not installed (apt-get install ffmpeg)")
  write_wavs(str(tmp_path / "wav"), n=len(audio.EXTENSIONS), seconds=1.5)
  classes = tmp_path / "classes"
  for i, ext in enumerate(audio.EXTENSIONS):
    (classes / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(tmp_path / "wav" / f"{i:02d}.wav"),
                    "-ar", "16000" if ext != ".opus" else "48000",
                    str(classes / f"c{i % 2}" / f"{i:02d}{ext}")], check=True)
  cfg = _audio_cfg(str(classes))
  cfg.data.on_bad_rate = "resample"   # opus is 48 kHz: the trainer resamples it as the probe does
  ds = probe_cli.load_labelled(cfg, None, str(classes))
  assert sorted(os.path.splitext(n)[1] for n in ds.names) == sorted(audio.EXTENSIONS)
  assert ds.names == audio.list_files(str(classes)) == sorted(audio.index(cfg, None)["paths"])
  for name, clip in zip(ds.names, ds.arrays["audio"]):
    stem = os.path.splitext(os.path.basename(name))[0]
    with wave.open(str(tmp_path / "wav" / f"{stem}.wav")) as w:
      x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64)[:16_000]
    lag = max(range(0, 400), key=lambda d: np.corrcoef(x[:15_000], clip[d:d + 15_000])[0, 1])
    assert np.corrcoef(x[:15_000], clip[lag:lag + 15_000])[0, 1] > 0.9, name   # codec delay <= 25 ms


# ---------------------------------------------------------------------------- images


def _vision_cfg(path: str, **data):
  cfg = config_lib.load_file("configs/vision.py:variant=tiny,runlocal")
  cfg.data.path, cfg.batch_size = path, 4
  cfg.model.image_size, cfg.model.patch_size = 32, 8
  cfg.data.num_mask_patches, cfg.data.min_mask_block = 7, 4
  cfg.data.update(dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False,
                       color_jitter=(0.0, 0.0, 0.0), extensions=()))
  cfg.data.update(data)
  return cfg


def _alpha_png(path: str) -> None:
  """32 x 32 RGBA: left half transparent black, right half opaque red, rows 12..19 of the
  right half half-transparent red (alpha 128)."""
  a = np.zeros((32, 32, 4), np.uint8)
  a[:, 16:] = (255, 0, 0, 255)
  a[12:20, 16:, 3] = 128
  Image.fromarray(a, "RGBA").save(path)


@pytest.mark.parametrize("bg", [None, (0, 128, 255)])
def test_alpha_is_composited_onto_the_background(tmp_path, bg):
  """Trainer (crop = whole image, no flip / jitter) and probe give the same pixels: transparent
  -> data.background (default white), half-transparent red -> the 50/50 mix."""
  for cls in ("x", "y"):
    (tmp_path / cls).mkdir()
    _alpha_png(str(tmp_path / cls / "a.png"))
  cfg = _vision_cfg(str(tmp_path), **({} if bg is None else {"background": bg}))
  mean, std = np.array(cfg.data.mean), np.array(cfg.data.std)
  back = np.array((255, 255, 255) if bg is None else bg) / 255.0
  red = np.array([1.0, 0.0, 0.0])
  half = red * (128 / 255) + back * (127 / 255)

  trainer = next(vision.build_dataset(cfg, str(tmp_path / "w"), start_step=0, process_index=0,
                                      process_count=1))["image"][0]
  probed = vision.load_image(str(tmp_path / "x" / "a.png"), cfg)
  for img in (trainer, probed):
    rgb = img * std + mean
    np.testing.assert_allclose(rgb[4, 4], back, atol=2e-3)       # transparent
    np.testing.assert_allclose(rgb[4, 28], red, atol=2e-3)       # opaque
    np.testing.assert_allclose(rgb[16, 28], half, atol=2e-3)     # alpha 128
  np.testing.assert_allclose(trainer, probed, atol=1e-4)


def test_every_decodable_image_format_is_read_by_trainer_and_probe(tmp_path):
  """One list (vision.EXTENSIONS): jpg, png, gif, bmp, webp files are listed and decoded by
  the trainer (no bad image) and by the probe's class folders alike."""
  rng = np.random.default_rng(0)
  fmts = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "gif": "GIF", "bmp": "BMP", "webp": "WEBP"}
  assert set(vision.EXTENSIONS) == {"." + e for e in fmts}
  for i, (ext, fmt) in enumerate(fmts.items()):
    d = tmp_path / f"c{i % 2}"
    d.mkdir(exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / f"{i}.{ext}", fmt)
  (tmp_path / "c0" / "notes.txt").write_text("not an image")
  cfg = _vision_cfg(str(tmp_path))
  cfg.batch_size = 6
  files = vision.list_images(cfg.data.path, vision.image_extensions(cfg))
  assert len(files) == 6 and not any(f.endswith(".txt") for f in files)
  it = vision.build_dataset(cfg, str(tmp_path / "w"), start_step=0, process_index=0, process_count=1)
  batch = next(it)
  assert it.bad.count == 0 and batch["mask"].sum(1).tolist() == [7] * 6
  ds = probe_cli.load_labelled(cfg, None, str(tmp_path))
  assert sorted(ds.names) == files and ds.arrays["image"].shape == (6, 32, 32, 3)
  with pytest.raises(config_lib.ConfigError, match=r"data.extensions holds \['.tiff'\]"):
    vision.image_extensions(_vision_cfg(str(tmp_path), extensions=(".png", ".tiff")))


# ---------------------------------------------------------------------------- console


def test_cpu_run_prints_only_its_own_lines(tmp_path):
  """`python -m d2v_jax.train` on CPU with libtpu / TF installed and none of the quieting
  variables set: the first line is the trainer's own, and no start-up noise line appears."""
  corpus = write_corpus(str(tmp_path / "c.txt"), lines=300)
  text_tokenizer.train_tokenizer(open(corpus).read().splitlines(), 300, str(tmp_path / "tok"))
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_", "TF_", "TPU_", "XLA_", "GRPC_", "ABSL_"))}
  env["PYTHONPATH"] = ROOT
  cmd = [sys.executable, "-m", "d2v_jax.train", "--config", "configs/text.py:variant=tiny,runlocal",
         "--workdir", str(tmp_path / "run"), f"--config.data.path={corpus}",
         f"--config.data.tokenizer={tmp_path / 'tok'}", "--config.data.block_size=16",
         "--config.batch_size=2", "--config.total_steps=1", "--config.log_every=1"]
  out = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=600)
  lines = out.stdout.splitlines()
  assert out.returncode == 0, out.stdout[-3000:]
  own = ("distributed: ", "cached corpus: ", "mesh ", "training tokenizer")  # the trainer's lines
  assert lines[0].startswith(own), lines[:5]
  assert any(x.startswith("cached corpus: ") for x in lines[:3]), lines[:5]
  noise = [x for x in lines if console.NOISE.search(x) or re.match(r"[IWEF]\d{4} ", x)]
  assert not noise, noise
  assert lines[-1].startswith("done in ") and any(x.startswith("step       1/1 |") for x in lines)
  # The start-up line that names the attention implementation `auto` chose (#15): on CPU the
  # XLA path for teacher and student, for the text embedder's key-padding bias.
  att = [x for x in lines if x.startswith("attention=")]
  assert len(att) == 1 and re.match(r"attention=auto on cpu \(float32, head dim \d+\): "
                                    r"teacher xla \(.+\); student xla \(.+\)$", att[0]), att
  assert len(lines) <= 8, lines
