"""Audio input pipeline (d2v_jax/data/audio.py) on the real Asterisk prompts and on bad files."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import wave

import numpy as np
import pytest
import tensorflow as tf

from d2v_jax import config as config_lib
from d2v_jax.data import audio_buckets, audio_index
from d2v_jax.config import ConfigError
from d2v_jax.data import audio, order
from d2v_jax.data.masking_audio import conv_output_length, target_counts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = os.path.join(ROOT, "data", "audio", "prompts")


@pytest.fixture(scope="module")
def prompts():
  files = sorted(glob.glob(os.path.join(PROMPTS, "*.wav")))
  if len(files) < 100:
    pytest.skip(f"{PROMPTS} missing: run .ci/setup (Debian asterisk-core-sounds-en-g722 + ffmpeg)")
  return files


def _cfg(path: str, **data):
  cfg = config_lib.load_file("configs/audio.py:variant=tiny,runlocal")
  cfg.data.path = path
  cfg.data.update(data)
  return cfg


def _read_wav(path: str) -> np.ndarray:
  with wave.open(path) as w:
    return np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768


def _write_wav(path: str, x: np.ndarray, rate: int) -> None:
  with wave.open(path, "wb") as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(rate)
    w.writeframes((np.clip(x, -1, 1) * 32767).astype(np.int16).tobytes())


def _take(cfg, workdir, n, start=0, process_index=0, process_count=1):
  it = audio.build_dataset(cfg, workdir, start_step=start, process_index=process_index,
                           process_count=process_count)
  return [next(it) for _ in range(n)]


def _find_crop(x: np.ndarray, row: np.ndarray) -> int:
  """Offset of `row` inside the normalised clip x (-1: not a window of x)."""
  for off in np.flatnonzero(np.abs(x[:len(x) - len(row) + 1] - row[0]) < 1e-4):
    if np.allclose(x[off:off + len(row)], row, atol=1e-4):
      return int(off)
  return -1


def test_real_batches_buckets_norm_mask_resume(prompts, tmp_path):
  """runlocal (buckets of 1, 1.5 and 2 s) on the real prompts: every batch is one bucket,
  unpadded, each row a crop of its normalised file, masks with the exact per-row count;
  deterministic, resumable, disjoint across processes."""
  cfg = _cfg(os.path.join(PROMPTS, "*.wav"))
  audio.validate(cfg)
  idx = audio.index(cfg, str(tmp_path))
  assert audio_index.num_examples(idx) + idx["skipped_short"] == len(prompts)
  assert idx["lengths"].min() >= cfg.data.min_samples
  plan = audio.bucket_plan(cfg, str(tmp_path))
  assert plan.crops == (16_000, 24_000, 32_000) and plan.batch == (16, 8, 8)  # 8 test devices
  assert sum(plan.count) == audio_index.num_examples(idx)                           # no clip left out
  shapes = {c: (b, c) for c, b in zip(plan.crops, plan.batch)}
  batches = _take(cfg, str(tmp_path), 6)
  counts = target_counts(99, cfg.data.mask_prob, cfg.data.span)
  for step, batch in enumerate(batches):
    crop, ids = audio.batch_indices(cfg, str(tmp_path), step)
    t = audio.frames(cfg, crop)
    assert batch["audio"].shape == shapes[crop] and batch["audio"].dtype == np.float32
    assert batch["mask"].shape == (len(ids), t) and batch["mask"].dtype == bool
    assert (batch["audio_len"] == crop).all()                                # no padding
    assert (batch["mask"].sum(1) == counts[t]).all()                         # exact count per row
    assert (idx["lengths"][ids] >= crop).all()
    if step == 0:  # each row is a crop of its own normalised file
      for row, i in zip(batch["audio"], ids):
        x = _read_wav(str(idx["paths"][i]))
        assert _find_crop((x - x.mean()) / np.sqrt(x.var() + 1e-5), row) >= 0
  assert len({b["audio"].shape for b in batches}) >= 2
  # determinism and resume: batch 5 of a fresh stream == batch 5 of a stream started at 5
  resumed = _take(cfg, str(tmp_path), 1, start=5)[0]
  for k in ("audio", "audio_len", "mask"):
    np.testing.assert_array_equal(batches[5][k], resumed[k])
  # two processes read disjoint halves of the same global batch
  for step in range(4):
    crop, ids = audio.batch_indices(cfg, str(tmp_path), step)
    halves = [audio.batch_indices(cfg, str(tmp_path), step, process_index=i, process_count=2) for i in (0, 1)]
    assert halves[0][0] == halves[1][0] == crop
    assert not set(halves[0][1]) & set(halves[1][1])
    assert sorted(np.concatenate([h[1] for h in halves])) == sorted(ids)
  p0 = _take(cfg, str(tmp_path), 1, process_index=0, process_count=2)[0]
  assert p0["audio"].shape == (batches[0]["audio"].shape[0] // 2, batches[0]["audio"].shape[1])
  ex = audio.example_batch(cfg, 4)
  assert {k: v.shape for k, v in ex.items()} == {"audio": (4, 32_000), "audio_len": (4,), "mask": (4, 99)}


def test_unbucketed_batches_pad_and_keep_the_old_order(prompts, tmp_path):
  """data.buckets=(): one static shape, crops of max_samples right-padded, uncropped rows are
  their normalised file sample for sample, the order is order.py's; masks never touch padding
  and rows of equal valid length get equal counts."""
  cfg = _cfg(os.path.join(PROMPTS, "*.wav"), buckets=())
  idx = audio.index(cfg, str(tmp_path))
  s, t, b = cfg.data.max_samples, audio.frames(cfg, cfg.data.max_samples), cfg.batch_size
  batches = _take(cfg, str(tmp_path), 2)
  counts = target_counts(t, cfg.data.mask_prob, cfg.data.span)
  for batch in batches:
    assert batch["audio"].shape == (b, s) and batch["mask"].shape == (b, t) == (b, 99)
    lens = batch["audio_len"]
    assert (lens >= cfg.data.min_samples).all() and (lens <= s).all()
    pad = np.arange(s)[None, :] >= lens[:, None]
    assert (batch["audio"][pad] == 0).all()
    frames = conv_output_length(lens, cfg.model.conv_kernels, cfg.model.conv_strides)
    assert not (batch["mask"] & (np.arange(t)[None, :] >= frames[:, None])).any()
    np.testing.assert_array_equal(batch["mask"].sum(1), counts[frames])
  ids = order.example_indices(0, num_examples=audio_index.num_examples(idx), global_batch=b, seed=cfg.seed,
                              process_index=0, process_count=1).numpy()
  np.testing.assert_array_equal(audio.batch_indices(cfg, str(tmp_path), 0)[1], ids)
  checked = 0
  for j, i in enumerate(ids):
    x = _read_wav(str(idx["paths"][i]))
    n = batches[0]["audio_len"][j]
    assert n == min(len(x), s)
    if len(x) <= s:
      np.testing.assert_allclose(batches[0]["audio"][j, :n], (x - x.mean()) / np.sqrt(x.var() + 1e-5),
                                 atol=1e-4)
      checked += 1
  assert checked >= 2


def test_v2_batches_masks_and_visible(prompts, tmp_path):
  """objective=v2: "mask" [b, M, T] with exactly int(T * R) masked frames per clone,
  "visible" [b, M, K] = the ascending unmasked frames, K = T - int(T * R), per bucket;
  example_batch has the same structure; v2 without buckets is refused."""
  cfg = _cfg(os.path.join(PROMPTS, "*.wav"))
  cfg.objective = "v2"
  cfg.v2.update(dict(clone_batch=3, mask_prob=0.5, mask_adjust=0.05, mask_length=5))
  audio.validate(cfg)
  seen = set()
  for step, batch in enumerate(_take(cfg, str(tmp_path), 6)):
    b, s = batch["audio"].shape
    t = audio.frames(cfg, s)
    k = t - int(t * 0.5)
    assert batch["mask"].shape == (b, 3, t) and batch["visible"].shape == (b, 3, k)
    assert batch["visible"].dtype == np.int32 and (batch["mask"].sum(-1) == int(t * 0.5)).all()
    want = np.stack([np.stack([np.flatnonzero(~c) for c in ex]) for ex in batch["mask"]])
    np.testing.assert_array_equal(batch["visible"], want)
    assert all(len({c.tobytes() for c in ex}) == 3 for ex in batch["mask"])  # distinct clones
    seen.add(s)
  assert len(seen) >= 2
  ex = audio.example_batch(cfg, 2)
  assert {k: v.shape for k, v in ex.items()} == {"audio": (2, 32_000), "audio_len": (2,),
                                                 "mask": (2, 3, 99), "visible": (2, 3, 50)}
  cfg.data.buckets = ()
  with pytest.raises(ConfigError, match="objective=v2 needs length buckets"):
    audio.validate(cfg)


def test_flac_and_tfrecord_sources_match_wav(prompts, tmp_path):
  """FLAC (decoded by ffmpeg) and TFRecords (wav bytes, float samples) give the same samples."""
  if shutil.which("ffmpeg") is None:
    pytest.skip("ffmpeg not installed")
  picks = [p for p in prompts if 20_000 <= os.path.getsize(p) <= 60_000][:4]  # 0.6-1.9 s
  flac_dir = tmp_path / "flac"
  flac_dir.mkdir()
  for p in picks:
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", p,
                    str(flac_dir / os.path.basename(p).replace(".wav", ".flac"))], check=True)
  common = dict(min_samples=0, max_samples=40_000, mask_prob=0.65, buckets=())
  want = sorted(tuple(np.round((x - x.mean()) / np.sqrt(x.var() + 1e-5), 4)[:100])
                for x in map(_read_wav, picks))

  def rows(cfg, work):
    cfg.batch_size = 4
    batch = _take(cfg, str(work), 1)[0]
    assert sorted(batch["audio_len"].tolist()) == sorted(len(_read_wav(p)) for p in picks)
    return sorted(tuple(np.round(r, 4)[:100]) for r in batch["audio"])

  flac = _cfg(str(flac_dir), **common)  # a directory: its files with audio.EXTENSIONS
  assert audio.index(flac, None)["decoders"].tolist() == [1] * 4
  np.testing.assert_allclose(rows(flac, tmp_path / "w1"), want, atol=2e-4)

  for kind in ("bytes", "float"):
    rec = str(tmp_path / f"{kind}.tfrecord")
    with tf.io.TFRecordWriter(rec) as w:
      for p in picks:
        if kind == "bytes":
          feat = {"audio": tf.train.Feature(bytes_list=tf.train.BytesList(value=[open(p, "rb").read()]))}
        else:
          feat = {"audio": tf.train.Feature(float_list=tf.train.FloatList(value=_read_wav(p))),
                  "sample_rate": tf.train.Feature(int64_list=tf.train.Int64List(value=[16000]))}
        w.write(tf.train.Example(features=tf.train.Features(feature=feat)).SerializeToString())
    cfg = _cfg(rec, source="tfrecord", **common)
    np.testing.assert_allclose(rows(cfg, tmp_path / kind), want, atol=2e-4)
  # bucketing a record source needs every record's length: decoded once, cached in the workdir
  cfg = _cfg(rec, source="tfrecord", **{**common, "buckets": (8_000,)})
  lengths = audio_buckets.example_lengths(cfg, str(tmp_path / "len"))
  assert sorted(lengths.tolist()) == sorted(len(_read_wav(p)) for p in picks)
  assert len(glob.glob(str(tmp_path / "len" / "audio_lengths_*.npz"))) == 1


def test_bad_files_name_their_path(prompts, tmp_path):
  good = tmp_path / "good.wav"
  shutil.copy(prompts[0], good)
  cases = {
      "garbage.wav": (b"this is not audio at all" * 10, r"garbage\.wav: cannot be read"),
      "empty.wav": (b"", r"empty\.wav: cannot be read \(is empty \(0 bytes\)\)"),
  }
  for name, (data, pattern) in cases.items():
    d = tmp_path / name.split(".")[0]
    d.mkdir()
    shutil.copy(good, d / "ok.wav")
    (d / name).write_bytes(data)
    with pytest.raises(ConfigError, match=str(d).replace(".", r"\.") + "/" + pattern):
      audio.index(_cfg(str(d / "*.wav")), None)

  # 8 kHz speech: error naming the file, or resampled to 16 kHz by config
  d = tmp_path / "rate"
  d.mkdir()
  x = _read_wav(prompts[0])
  _write_wav(str(d / "slow.wav"), x[::2], 8000)
  with pytest.raises(ConfigError,
                     match=r"slow\.wav has sample rate 8000 Hz but data\.sample_rate=16000.*on_bad_rate=resample"):
    audio.index(_cfg(str(d / "*.wav"), min_samples=0), None)
  cfg = _cfg(str(d / "*.wav"), min_samples=0, on_bad_rate="resample", max_samples=400_000, buckets=())
  cfg.batch_size = 1
  batch = _take(cfg, None, 1)[0]
  assert batch["audio_len"][0] == 2 * len(x[::2])
  assert np.isfinite(batch["audio"]).all() and abs(batch["audio"][0, :batch["audio_len"][0]].std() - 1) < 1e-3

  # a file that breaks after indexing (corrupt payload): the read error names it
  d = tmp_path / "later"
  d.mkdir()
  shutil.copy(good, d / "a.wav")
  cfg = _cfg(str(d / "*.wav"), min_samples=0, buckets=())
  cfg.batch_size = 1
  audio.index(cfg, None)
  (d / "a.wav").write_bytes(b"RIFF" + b"\0" * 40)
  with pytest.raises(ValueError, match=r"later/a\.wav .*\(batch of step 0\)"):
    _take(cfg, None, 1)


_TFDS_BUILDER = '''
import wave
import numpy as np
import tensorflow_datasets as tfds

FILES = []


class MiniSpeech(tfds.core.GeneratorBasedBuilder):
  """LibriSpeech-shaped: int16 "speech" Audio feature at 16 kHz."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "speech": tfds.features.Audio(sample_rate=16000, dtype=np.int16), "id": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for p in FILES:
      with wave.open(p) as w:
        yield p, {"speech": np.frombuffer(w.readframes(w.getnframes()), np.int16), "id": p}
'''


def test_tfds_source(prompts, tmp_path, monkeypatch):
  """A prepared tfds dataset (built offline here, LibriSpeech's feature layout) is read by
  random access to its TFRecord shards: same samples as the WAV files, split slicing works."""
  import importlib
  import tensorflow_datasets as tfds
  pkg = tmp_path / "pkg" / "d2v_mini_speech"
  pkg.mkdir(parents=True)
  (pkg / "__init__.py").write_text(_TFDS_BUILDER)
  monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
  mod = importlib.import_module("d2v_mini_speech")
  picks = [p for p in prompts if 20_000 <= os.path.getsize(p) <= 60_000][:4]
  mod.FILES[:] = picks
  builder = mod.MiniSpeech(data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))

  cfg = _cfg(builder.data_dir, source="tfds", split="train", audio_key="speech", min_samples=0,
             max_samples=40_000, buckets=())
  cfg.batch_size = 4
  idx = audio.index(cfg, None)
  assert idx["kind"] == "tfds" and len(idx["offsets"]) == 4 and int(idx["rate"]) == 16000
  batch = _take(cfg, None, 1)[0]
  assert sorted(batch["audio_len"].tolist()) == sorted(len(_read_wav(p)) for p in picks)
  want = sorted(tuple(np.round((x - x.mean()) / np.sqrt(x.var() + 1e-5), 4)[:100])
                for x in map(_read_wav, picks))
  np.testing.assert_allclose(sorted(tuple(np.round(r, 4)[:100]) for r in batch["audio"]), want, atol=2e-4)
  half = _cfg(builder.data_dir, source="tfds", split="train[:50%]", audio_key="speech")
  assert len(audio.index(half, None)["offsets"]) == 2
  with pytest.raises(ConfigError, match="has no split data.split='test'"):
    audio.index(_cfg(builder.data_dir, source="tfds", split="test", audio_key="speech"), None)
  with pytest.raises(ConfigError, match="has no feature 'wave'; features: .*'speech'"):
    audio.index(_cfg(builder.data_dir, source="tfds", split="train", audio_key="wave"), None)
