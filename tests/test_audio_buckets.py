"""Length-bucketed audio batches (d2v_jax/data/audio.py): bucket assignment on a
LibriSpeech-like length distribution, and the pipeline on tiny synthetic WAV files: one shape
per bucket, exact resume across bucket changes, disjoint per-process shards."""

from __future__ import annotations

import collections
import wave

import numpy as np
import pytest

from d2v_jax import config as config_lib
from d2v_jax.data import audio_buckets
from d2v_jax.data import audio

RATE = 16_000
CROPS = (4_000, 8_000, 16_000)          # 0.25 / 0.5 / 1 s: tiny crops keep the CPU test cheap
# clips per bucket; with batch_size 4 and batch_multiple 2 the bucket batches are 16 / 8 / 4
CLIPS = {4_000: 20, 8_000: 12, 16_000: 10}


def _librispeech_like_seconds(n: int = 281_000, seed: int = 0) -> np.ndarray:
  """Synthetic utterance lengths shaped like LibriSpeech-960 (281k utterances, 1-35 s, mean
  ~12.9 s, most between 10 and 17 s, a few long ones)."""
  rng = np.random.default_rng(seed)
  body = np.clip(rng.normal(14.0, 2.2, int(n * 0.85)), 1, 35)
  short = rng.uniform(1, 10, n - len(body))
  tail = rng.uniform(17, 35, n // 100)
  return np.concatenate([body, short, tail])


def test_buckets_remove_padding_on_librispeech_lengths():
  """The base config's buckets (2, 4, ..., 20 s) on LibriSpeech-like lengths: no padding at
  all (the single padded 20 s shape wastes ~36 % of its frames), ~10 % of the audio cropped
  away, only clips under 2 s left out; one batch shape per bucket; batches are multiples of
  the device count with about the same audio each."""
  secs = _librispeech_like_seconds()
  lengths = (secs * RATE).astype(np.int64)
  cfg = config_lib.load_file("configs/audio.py:variant=base")
  crops = audio.crop_lengths(cfg)
  assert crops == tuple(s * RATE for s in range(2, 21, 2))
  plan = audio_buckets.make_plan(lengths, crops, cfg.batch_size, 8)
  stats = audio_buckets.plan_stats(lengths, plan)
  single = audio_buckets.plan_stats(lengths, audio_buckets.make_plan(lengths, (cfg.data.max_samples,), cfg.batch_size,
                                                     8, padded=True))
  print(f"mean {secs.mean():.1f} s; buckets: {stats}; single padded shape: {single}")
  assert stats["padded_fraction"] < 0.05 and stats["padded_fraction"] == 0.0
  assert single["padded_fraction"] > 0.30
  assert stats["cropped_fraction"] < 0.12
  assert stats["left_out"] == int((lengths < 2 * RATE).sum())
  assert stats["shapes"] == len(crops) == 10
  assert all(b % 8 == 0 for b in plan.batch) and plan.batch[-1] == cfg.batch_size
  audio_per_batch = np.array(plan.batch) * np.array(crops)
  assert audio_per_batch.max() <= cfg.batch_size * cfg.data.max_samples
  assert audio_per_batch.min() >= 0.9 * cfg.batch_size * cfg.data.max_samples
  # every kept clip sits in the largest bucket <= its length (or a smaller one it was folded to)
  keep = plan.bucket >= 0
  assert (np.asarray(crops)[plan.bucket[keep]] <= lengths[keep]).all()


def test_small_buckets_fold_down():
  """A bucket with fewer clips than one batch hands its clips to the next smaller bucket."""
  lengths = np.array([5_000] * 20 + [9_000] * 3 + [17_000] * 6)
  plan = audio_buckets.make_plan(lengths, CROPS, 4, 2)
  assert plan.batch == (16, 8, 4) and plan.count == (23, 0, 6)
  assert plan.active == [0, 2] and plan.per_epoch == (1, 0, 2)


def _write(path, n: int, rng) -> None:
  t = np.arange(n) / RATE
  x = 0.4 * np.sin(2 * np.pi * rng.uniform(150, 600) * t) + 0.05 * rng.normal(size=n)
  with wave.open(str(path), "wb") as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(RATE)
    w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())


@pytest.fixture(scope="module")
def wav_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("bucket_wavs")
  rng = np.random.default_rng(0)
  i = 0
  for crop, n in CLIPS.items():
    for _ in range(n):
      _write(d / f"{i:03d}.wav", int(rng.integers(crop, int(crop * 1.5))), rng)
      i += 1
  _write(d / "short.wav", 3_000, rng)   # under the smallest bucket: left out
  return str(d)


def _cfg(path: str):
  cfg = config_lib.load_file("configs/audio.py:variant=tiny,runlocal")
  cfg.data.update(dict(path=path, buckets=CROPS, max_samples=16_000, min_samples=0, batch_multiple=2))
  cfg.batch_size = 4
  return cfg


def _take(cfg, workdir, n, start=0, process_index=0, process_count=1):
  it = audio.build_dataset(cfg, workdir, start_step=start, process_index=process_index,
                           process_count=process_count)
  return [next(it) for _ in range(n)]


def test_one_shape_per_bucket_and_schedule(wav_dir, tmp_path):
  """Every schedule epoch holds each bucket exactly per_epoch times; batches never repeat a
  clip and only hold clips long enough for their bucket; over 8 epochs every clip of a
  bucket is read (the too-short clip never); the batches take one shape per bucket."""
  cfg = _cfg(wav_dir)
  w = str(tmp_path)
  plan = audio.bucket_plan(cfg, w)
  assert plan.crops == CROPS and plan.batch == (16, 8, 4) and plan.count == (20, 12, 10)
  assert plan.per_epoch == (1, 2, 3)                    # round(20/16), round(12/8), round(10/4)
  epoch = sum(plan.per_epoch)
  bucket_of, batch_ids = audio_buckets.step_fns(cfg, plan, 0, 1)
  steps = [(CROPS[int(bucket_of(s))], batch_ids(s).numpy()) for s in range(8 * epoch)]
  for s in range(3):  # the public helper gives the same answer
    crop, ids = audio.batch_indices(cfg, w, s)
    assert crop == steps[s][0] and (ids == steps[s][1]).all()
  for e in range(8):
    got = collections.Counter(c for c, _ in steps[e * epoch:(e + 1) * epoch])
    assert got == {c: n for c, n in zip(CROPS, plan.per_epoch)}
  idx = audio.index(cfg, w)
  short = int(np.flatnonzero(idx["lengths"] == 3_000)[0])
  assert plan.bucket[short] == -1
  for crop, ids in steps:
    assert len(set(ids.tolist())) == len(ids) and (idx["lengths"][ids] >= crop).all()
  for k, crop in enumerate(CROPS):
    reads = {i for c, ids in steps if c == crop for i in ids}
    assert reads == set(np.flatnonzero(plan.bucket == k)), crop
  batches = _take(cfg, w, epoch)
  shapes = {b["audio"].shape for b in batches}
  assert shapes == {(16, 4_000), (8, 8_000), (4, 16_000)}
  for b, (crop, _) in zip(batches, steps):
    assert b["audio"].shape[1] == crop and (b["audio_len"] == crop).all()
    assert b["mask"].shape == (b["audio"].shape[0], audio.frames(cfg, crop))


def test_resume_across_a_bucket_change_and_disjoint_shards(wav_dir, tmp_path):
  """Batches of a stream started at step s equal those of a stream from 0 at the same steps,
  for an s whose bucket differs from the previous step's; with 2 processes each reads a
  disjoint half of every global batch, and together they read exactly its clips."""
  cfg = _cfg(wav_dir)
  w = str(tmp_path)
  plan = audio.bucket_plan(cfg, w)
  one, *two = (audio_buckets.step_fns(cfg, plan, p, n) for p, n in ((0, 1), (0, 2), (1, 2)))
  crops = [CROPS[int(one[0](s))] for s in range(8)]
  s = next(i for i in range(2, 6) if crops[i] != crops[i - 1])
  full = _take(cfg, w, s + 3)
  resumed = _take(cfg, w, 3, start=s)
  for a, b in zip(full[s:], resumed):
    assert a.keys() == b.keys() == {"audio", "audio_len", "mask"}
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert full[s]["audio"].shape != full[s - 1]["audio"].shape
  for step in range(12):
    ids = one[1](step).numpy()
    halves = [f[1](step).numpy() for f in two]
    assert int(two[0][0](step)) == int(two[1][0](step)) == int(one[0](step))
    assert len(halves[0]) == len(halves[1]) == len(ids) // 2
    assert not set(halves[0]) & set(halves[1])
    assert sorted(np.concatenate(halves).tolist()) == sorted(ids.tolist())
  p1 = _take(cfg, w, 1, start=s, process_index=1, process_count=2)[0]
  assert p1["audio"].shape == (full[s]["audio"].shape[0] // 2, full[s]["audio"].shape[1])
