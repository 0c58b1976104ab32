"""Audio formats and indexing (d2v_jax/data/audio.py): list_files over directories of every
format in EXTENSIONS, .ogg / .mp3 folders through the trainer's pipeline, the indexing
progress line and data.on_bad_file=skip."""

from __future__ import annotations

import os
import shutil
import subprocess
import wave

import numpy as np
import pytest

from d2v_jax import config as config_lib
from d2v_jax.config import ConfigError
from d2v_jax.data import audio, audio_index

RATE = 16_000


def _wav(path, n: int, freq: float) -> np.ndarray:
  t = np.arange(n) / RATE
  x = 0.5 * np.sin(2 * np.pi * freq * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
  with wave.open(str(path), "wb") as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(RATE)
    w.writeframes((x * 32767).astype("<i2").tobytes())
  return x


def _cfg(path: str, **data):
  cfg = config_lib.load_file("configs/audio.py:variant=tiny,runlocal")
  cfg.data.update(dict(path=path, min_samples=0, max_samples=24_000, buckets=()))
  cfg.data.update(data)
  cfg.batch_size = 2
  return cfg


def test_list_files_directories_globs_and_extensions(tmp_path):
  """A directory gives its files (recursively) with an extension in EXTENSIONS, any case;
  globs keep whatever they match; comma-separated entries are merged and sorted."""
  assert audio.EXTENSIONS == (".wav", ".flac", ".ogg", ".mp3", ".opus", ".m4a")
  (tmp_path / "a" / "sub").mkdir(parents=True)
  names = ["a/x.wav", "a/sub/y.OGG", "a/z.mp3", "a/w.opus", "a/v.m4a", "a/u.flac", "a/notes.txt",
           "b.raw"]
  for n in names:
    (tmp_path / n).write_bytes(b"")
  got = audio.list_files(f"{tmp_path / 'a'}, {tmp_path / '*.raw'}")
  want = sorted(str(tmp_path / n) for n in names if not n.endswith(".txt"))
  assert got == want
  with pytest.raises(ConfigError, match="matches no audio file"):
    audio.list_files(str(tmp_path / "nothing*"))


@pytest.mark.parametrize("fmt,codec", [("ogg", "libvorbis"), ("mp3", "libmp3lame")])
def test_folder_of_compressed_files_is_indexed_and_decoded(tmp_path, fmt, codec):
  """A directory of .ogg (Vorbis) or .mp3 files, made with ffmpeg from synthetic WAVs, goes
  through index (ffprobe lengths) and the training pipeline (ffmpeg decode): lengths within
  a codec frame of the source, and the decoded, normalised rows correlate > 0.99 with the
  normalised source signal (best lag within 1,200 samples of encoder delay)."""
  if shutil.which("ffmpeg") is None:
    pytest.skip("ffmpeg not installed (apt-get install ffmpeg)")
  src, out = tmp_path / "src", tmp_path / fmt
  src.mkdir()
  out.mkdir()
  signals = {}
  for i, (n, f) in enumerate([(16_000, 330.0), (20_000, 520.0)]):
    x = _wav(src / f"{i}.wav", n, f)
    r = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(src / f"{i}.wav"),
                        "-c:a", codec, "-b:a", "96k", str(out / f"{i}.{fmt}")], capture_output=True)
    if r.returncode != 0:
      pytest.skip(f"ffmpeg cannot encode {fmt} here: {r.stderr.decode()[-200:]}")
    signals[i] = x
  cfg = _cfg(str(out))
  idx = audio.index(cfg, None)
  assert [os.path.basename(p) for p in idx["paths"]] == [f"0.{fmt}", f"1.{fmt}"]
  assert idx["decoders"].tolist() == [1, 1]  # ffmpeg
  assert np.all(np.abs(idx["lengths"] - np.array([16_000, 20_000])) <= 1_152 + 1_105), idx["lengths"]
  batch = next(audio.build_dataset(cfg, None, start_step=0, process_index=0, process_count=1))
  assert sorted(batch["audio_len"].tolist()) == sorted(idx["lengths"].tolist())
  for row, n in zip(batch["audio"], batch["audio_len"]):
    i = int(np.argmin(np.abs(idx["lengths"] - n)))
    x = signals[i]
    x = (x - x.mean()) / x.std()
    y = row[:n]
    # y[lag + i] ~ x[i]: the lag of the largest cross-correlation, then Pearson r there
    xc = np.correlate(y, x, mode="full")[len(x) - 1 - 1_200:len(x) + 1_200]
    lag = int(np.argmax(xc)) - 1_200
    m = min(len(x), len(y) - lag) if lag >= 0 else min(len(x) + lag, len(y))
    best = np.corrcoef(x[max(0, -lag):max(0, -lag) + m], y[max(0, lag):max(0, lag) + m])[0, 1]
    print(f"{fmt} clip {i}: {n} samples (source {len(x)}), lag {lag}, correlation {best:.5f}")
    assert best > 0.99


def test_progress_line_and_bad_files_skipped(tmp_path, capsys, monkeypatch):
  """A progress line (counts, rate, ETA) for indexing; with data.on_bad_file=skip every
  unreadable file is named in one warning on stderr (sources.BadRecords); by default the
  first one stops the run naming its path."""
  for i in range(4):
    _wav(tmp_path / f"ok{i}.wav", 8_000, 300.0 + 50 * i)
  (tmp_path / "bad1.wav").write_bytes(b"not audio at all" * 8)
  (tmp_path / "bad2.wav").write_bytes(b"")
  monkeypatch.setattr(audio_index, "PROGRESS_SECONDS", 0.0)
  idx = audio.index(_cfg(str(tmp_path), on_bad_file="skip"), None)
  captured = capsys.readouterr()
  out, err = captured.out, captured.err
  assert idx["skipped_bad"] == 2 and len(idx["paths"]) == 4
  progress = [line for line in out.splitlines() if line.startswith("audio index: ") and "ETA" in line]
  assert len(progress) >= 4 and progress[-1].startswith("audio index: 5/6 files (83%), 2 skipped")
  warnings = [line for line in err.splitlines() if line.startswith("warning: skipped bad audio file")]
  assert len(warnings) == 2 and str(tmp_path / "bad1.wav") in warnings[0]
  assert str(tmp_path / "bad2.wav") in warnings[1] and "is empty (0 bytes)" in warnings[1]
  assert "audio index: 6 files in " in out and "4 kept, 0 shorter" in out and "2 unreadable (skipped)" in out
  with pytest.raises(ConfigError, match=r"bad1\.wav: cannot be read"):
    audio.index(_cfg(str(tmp_path)), None)
