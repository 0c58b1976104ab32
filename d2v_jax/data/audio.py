"""Audio input for data2vec-audio: index, decode, normalise, crop into length buckets, mask.

Sources (cfg.data.source), all read with tf.data by random access so that batch `s` of
process `p` is a pure function of (cfg.seed, s, p) (d2v_jax/data/order.py; O(1) resume):
  "files"     comma-separated globs and/or directories (`list_files`: a directory means every
              file below it whose extension is in EXTENSIONS: .wav .flac .ogg .mp3 .opus
              .m4a). 16-bit PCM WAV decodes in TensorFlow (tf.audio.decode_wav); every other
              format goes through the `ffmpeg` binary (Debian package; no Python audio library).
  "tfrecord"  globs of uncompressed TFRecord files of tf.train.Example with feature
              cfg.data.audio_key: bytes (an encoded audio file), float (samples) or int64
              (int16 samples); optional int64 feature cfg.data.rate_key (sample rate).
  "tfds"      a prepared tfds dataset (name or directory; never downloaded), split
              cfg.data.split, audio feature cfg.data.audio_key (LibriSpeech: "speech", int16),
              stored as TFRecord (the tfds default).
An index is built once at start-up (WAV/FLAC headers, ffprobe for other formats; TFRecord
record offsets), with a progress line every PROGRESS_SECONDS on process 0, and cached in
WORKDIR/audio_index_<hash>.npz.

Per example (fairseq RawAudioDataset, ALGORITHM.md §2.3): mono (channels averaged), at
cfg.data.sample_rate (a file at another rate is an error naming it, or is resampled when
data.on_bad_rate="resample": ffmpeg's resampler, or a Lanczos-3 anti-aliased resize in TF
for WAV), normalised over the whole utterance like F.layer_norm(wav, wav.shape) (zero mean,
unit variance, eps 1e-5), then a random crop (offset seeded per example).

Length buckets (data.buckets: crop lengths in samples; data.max_samples is always the
largest, larger entries are ignored). A clip goes to the largest bucket <= its length and is
cropped to exactly that length; clips shorter than the smallest bucket are left out (like
data.min_samples, which still applies). Each batch is drawn from one bucket, so batches
carry no padding and there are as many batch shapes (jit compilations) as buckets. The
global batch of bucket L is batch_size * max_samples / L rounded down to a multiple of
data.batch_multiple (0: jax.device_count(); at least that multiple), so the audio per batch
stays about constant and batch_size is the batch at the largest bucket. A bucket with fewer
clips than one batch hands them to the next smaller one (the smallest takes a smaller batch).
Order: a schedule "epoch" is a seeded permutation of round(n_k / b_k) batches of every
bucket k (evaluated per step with RandomIndexShuffle, nothing materialised); inside bucket k,
passes over a fresh seeded permutation of its n_k clips give n_k // b_k whole batches each.
So a step's bucket and clips are O(1) to compute at any step, no batch holds a clip twice,
and per-process shards of a global batch are disjoint. data.buckets = () gives one static
shape instead: crops of max_samples, shorter clips right-padded with zeros (hidden from the
model by audio_len). Record sources (tfrecord, tfds) have no lengths in their index:
bucketing them decodes every record once at start-up (cached in WORKDIR/audio_lengths_*.npz).

Batch (numpy), for a bucket of S samples (T = conv frames of S):
  "audio" float32 [b, S]; "audio_len" int32 [b] real samples (== S in bucketed batches, up to
      the few samples a resampled file's decoded length can fall short of its header length);
  cfg.objective "v1": "mask" bool [b, T], span masks with an exact count per row that
      depends only on its own valid length (d2v_jax/data/masking_audio.py span_mask);
  cfg.objective "v2": "mask" bool [b, M, T], M = v2.clone_batch block masks per example with
      exactly int(T * v2.mask_prob) masked frames each (masking_audio.block_mask_1d), and
      "visible" int32 [b, M, K], K = T - int(T * v2.mask_prob): the ascending unmasked frames
      (masking_v2.visible_indices). v2 needs buckets (its masks assume no padding).
example_batch(cfg, b) has the same structure at the largest bucket.

Bad input: an unreadable, empty, wrong-rate or too-short file raises one ValueError /
ConfigError line that names its path (at indexing, or while reading for corrupt payloads).
With data.on_bad_file="skip", unreadable or empty files are left out of the index instead:
the first is named in a warning, the others only counted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
import wave
from typing import Iterator

import ml_collections
import numpy as np
import tensorflow as tf

from d2v_jax.config import ConfigError
from d2v_jax.data import labelled, masking_v2, order
from d2v_jax.data.masking_audio import block_mask_1d, conv_output_length, receptive_field, span_mask

SOURCES = ("files", "tfrecord", "tfds")
# Audio formats a directory in data.path (or a probe folder) is searched for; ffmpeg decodes
# all of them (16-bit WAV also decodes in TensorFlow).
EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".m4a")
PROGRESS_SECONDS = 5.0   # indexing progress line interval (process 0)
_MASK_SALT = 0xA0D10     # mask stream, apart from the order and crop streams (same cfg.seed)
_CROP_SALT = 0xC0C0
_SCHED_SALT = 0x5C4ED    # which bucket each step draws from
_BUCKET_SALT = 0xB0C7E7  # + bucket: example order inside a bucket
_MARK = "d2v_audio:"     # tags our messages inside TensorFlow errors
_HEAD_BYTES = 1 << 16
_INDEX_VERSION = 1
# decoders
_TF_WAV, _FFMPEG = 0, 1


# --------------------------------------------------------------------------- headers


def _wav_info(head: bytes, size: int) -> tuple[int, int, int, bool]:
  """RIFF/WAVE header -> (rate, channels, frames, tf_decodable)."""
  if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
    raise ValueError("not a RIFF/WAVE file")
  pos, fmt = 12, None
  while pos + 8 <= len(head):
    cid, csz = head[pos:pos + 4], struct.unpack("<I", head[pos + 4:pos + 8])[0]
    if cid == b"fmt ":
      tag, ch, rate, _, _, bits = struct.unpack("<HHIIHH", head[pos + 8:pos + 24])
      fmt = (tag, ch, rate, bits)
    elif cid == b"data":
      if fmt is None:
        raise ValueError("WAV data chunk before its fmt chunk")
      tag, ch, rate, bits = fmt
      data = min(csz, size - pos - 8)
      frames = data // max(ch * bits // 8, 1)
      return rate, ch, frames, (tag == 1 and bits == 16)
    pos += 8 + csz + (csz & 1)
  raise ValueError("no WAV data chunk in the first 64 KiB")


def _flac_info(head: bytes) -> tuple[int, int, int]:
  """fLaC STREAMINFO -> (rate, channels, frames); frames 0 means unknown."""
  if head[:4] != b"fLaC" or (head[4] & 0x7F) != 0 or len(head) < 42:
    raise ValueError("not a FLAC file with a STREAMINFO block")
  x = int.from_bytes(head[18:26], "big")
  return x >> 44, ((x >> 41) & 7) + 1, x & ((1 << 36) - 1)


def _ffprobe(data: bytes) -> tuple[int, int, int]:
  """(rate, channels, frames) of any ffmpeg-readable audio, by decoding it."""
  wav = _ffmpeg_decode(data, rate=0)
  out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries",
                        "stream=sample_rate,channels", "-of", "json", "pipe:0"],
                       input=data, capture_output=True, check=False)
  info = json.loads(out.stdout or b"{}").get("streams", [{}])[0]
  return int(info.get("sample_rate", 0)), int(info.get("channels", 1)), len(wav)


def _ffmpeg_decode(data: bytes, rate: int) -> np.ndarray:
  """Encoded audio bytes -> float32 mono samples (resampled to `rate` when rate > 0)."""
  if shutil.which("ffmpeg") is None:
    raise ValueError("ffmpeg is not installed (apt-get install ffmpeg); it decodes non-WAV audio")
  cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", "pipe:0", "-ac", "1"]
  cmd += ["-ar", str(rate)] if rate > 0 else []
  out = subprocess.run(cmd + ["-f", "f32le", "pipe:1"], input=data, capture_output=True, check=False)
  if out.returncode != 0:
    raise ValueError(f"ffmpeg cannot decode it: {out.stderr.decode(errors='replace').strip()[:200]}")
  return np.frombuffer(out.stdout, np.float32)


def _file_info(path: str) -> tuple[int, int, int, int]:
  """(rate, channels, frames, decoder) of one audio file; ValueError on anything unreadable."""
  size = tf.io.gfile.stat(path).length
  if size == 0:
    raise ValueError("is empty (0 bytes)")
  with tf.io.gfile.GFile(path, "rb") as f:
    head = f.read(_HEAD_BYTES)
  if head[:4] == b"RIFF":
    rate, ch, frames, tf_ok = _wav_info(head, size)
    return rate, ch, frames, _TF_WAV if tf_ok else _FFMPEG
  if head[:4] == b"fLaC":
    rate, ch, frames = _flac_info(head)
    if frames > 0:
      return rate, ch, frames, _FFMPEG
  with tf.io.gfile.GFile(path, "rb") as f:
    rate, ch, frames = _ffprobe(f.read())
  return rate, ch, frames, _FFMPEG


# ----------------------------------------------------------------------------- index


def _expand(pattern: str, what: str, keep) -> list[str]:
  """Comma-separated globs and directories -> sorted file paths; a directory contributes the
  files below it (recursively) for which keep(name) is true."""
  files: set[str] = set()
  for p in (x.strip() for x in pattern.split(",")):
    if not p:
      continue
    if tf.io.gfile.isdir(p):
      for root, _, names in tf.io.gfile.walk(p):
        files.update(os.path.join(root, n) for n in names if keep(n))
    else:
      files.update(f for f in tf.io.gfile.glob(p) if not tf.io.gfile.isdir(f))
  if not files:
    raise ConfigError(f"data.path={pattern!r} matches no {what}; check the glob")
  return sorted(files)


def list_files(path: str) -> list[str]:
  """Audio files of comma-separated globs and/or directories, sorted. A glob keeps whatever
  it matches; a directory gives every file below it with an extension in EXTENSIONS (any
  case). ConfigError when nothing matches."""
  return _expand(path, "audio file", lambda n: os.path.splitext(n)[1].lower() in EXTENSIONS)


def _record_files(path: str) -> list[str]:
  """TFRecord files of globs and/or directories (a directory: names containing .tfrecord)."""
  return _expand(path, "TFRecord file", lambda n: ".tfrecord" in n.lower())


def _tfds_builder(cfg):
  import tensorflow_datasets as tfds
  path = cfg.data.path
  try:
    builder = tfds.builder_from_directory(path) if tf.io.gfile.isdir(path) else tfds.builder(path)
  except Exception as e:  # tfds raises many types for unknown names / bad dirs
    raise ConfigError(f"data.path={path!r} is not a tfds dataset: {str(e).splitlines()[0]}") from None
  if not tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json")):
    raise ConfigError(f"tfds dataset {path!r} is not prepared in {builder.data_dir} (nothing is "
                      "downloaded here): build it first or set data.path to its directory")
  if cfg.data.audio_key not in builder.info.features:
    raise ConfigError(f"tfds dataset {path!r} has no feature data.audio_key={cfg.data.audio_key!r}; "
                      f"features: {sorted(builder.info.features.keys())}")
  fmt = str(getattr(builder.info, "file_format", "tfrecord"))
  if "tfrecord" not in fmt.lower():
    raise ConfigError(f"tfds dataset {path!r} is stored as {fmt}; only TFRecord-stored tfds datasets "
                      "are read (the tfds default): prepare it with file_format=tfrecord")
  return builder


def _record_offsets(path: str) -> list[tuple[int, int]]:
  """(payload offset, payload length) of every record of an uncompressed TFRecord file."""
  out, off = [], 0
  size = tf.io.gfile.stat(path).length
  if size == 0:
    raise ValueError(f"TFRecord file {path} is empty (0 bytes); remove it or fix data.path")
  with tf.io.gfile.GFile(path, "rb") as f:
    while off < size:
      f.seek(off)
      h = f.read(12)
      if len(h) < 12:
        raise ValueError(f"TFRecord file {path} is truncated at byte {off} (or compressed; "
                         "only uncompressed TFRecords are read)")
      n = struct.unpack("<Q", h[:8])[0]
      if off + 16 + n > size:
        raise ValueError(f"TFRecord file {path}: record at byte {off} runs past the end of the file "
                         "(truncated or compressed)")
      out.append((off + 12, n))
      off += 16 + n
  return out


def _rate_error(what: str, rate: int, cfg) -> ConfigError:
  return ConfigError(f"{what} has sample rate {rate} Hz but data.sample_rate={cfg.data.sample_rate}: "
                     "resample the data or set --config.data.on_bad_rate=resample")


def _chief() -> bool:
  """Whether this is process 0 (the one that prints progress); True without JAX."""
  try:
    import jax
    return jax.process_index() == 0
  except Exception:  # no JAX / no backend: a single-process tool
    return True


def _duration(seconds: float) -> str:
  s = int(round(seconds))
  return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class _Progress:
  """A console line every PROGRESS_SECONDS while a long start-up pass runs (process 0 only):
  "audio index: 120/400 files (30%), 2 skipped, 64 files/s, ETA 4s"."""

  def __init__(self, what: str, total: int, unit: str = "files"):
    self.what, self.total, self.unit = what, total, unit
    self.t0 = self.last = time.perf_counter()
    self.enabled = _chief()

  def __call__(self, done: int, skipped: int = 0) -> None:
    now = time.perf_counter()
    if not self.enabled or now - self.last < PROGRESS_SECONDS or not 0 < done < self.total:
      return
    self.last = now
    rate = done / max(now - self.t0, 1e-9)
    eta = _duration((self.total - done) / rate) if rate > 0 else "?"
    print(f"{self.what}: {done}/{self.total} {self.unit} ({100 * done // max(self.total, 1)}%), "
          f"{skipped} skipped, {rate:.1f} {self.unit}/s, ETA {eta}", flush=True)

  def finish(self, note: str = "") -> None:
    if self.enabled:
      print(f"{self.what}: {self.total} {self.unit} in {_duration(time.perf_counter() - self.t0)}"
            f"{note}", flush=True)


def _build_index(cfg) -> dict:
  d = cfg.data
  if d.source == "files":
    paths, lens, rates, decs, short, bad = [], [], [], [], 0, 0
    files = list_files(d.path)
    progress = _Progress("audio index", len(files))
    skip_bad = d.get("on_bad_file", "error") == "skip"
    for done, p in enumerate(files):
      progress(done, short + bad)
      try:
        rate, ch, frames, dec = _file_info(p)
        if frames <= 0:
          raise ValueError("has no samples")
      except (ValueError, struct.error, OSError, tf.errors.OpError) as e:
        if not skip_bad:
          raise ConfigError(f"audio file {p} cannot be read: {e}") from None
        if not bad and _chief():  # named once; later ones are only counted
          print(f"warning: audio file {p} cannot be read ({e}); skipped (data.on_bad_file=skip); "
                "further unreadable files are only counted", flush=True)
        bad += 1
        continue
      if rate != d.sample_rate and d.on_bad_rate == "error":
        raise _rate_error(f"audio file {p}", rate, cfg)
      n = int(np.ceil(frames * d.sample_rate / rate))
      if n < d.min_samples:
        short += 1
        continue
      paths.append(p)
      lens.append(n)
      rates.append(rate)
      decs.append(dec)
    progress.finish(f": {len(paths)} kept, {short} shorter than data.min_samples={d.min_samples}"
                    + (f", {bad} unreadable (skipped)" if skip_bad else ""))
    if not paths:
      raise ConfigError(f"data.path={d.path!r}: no usable file ({short} shorter than "
                        f"data.min_samples={d.min_samples}, {bad} unreadable); lower min_samples "
                        "or fix data.path")
    return dict(kind="files", paths=np.array(paths), lengths=np.array(lens, np.int64),
                rates=np.array(rates, np.int32), decoders=np.array(decs, np.int8),
                skipped_short=short, skipped_bad=bad)
  if d.source == "tfrecord":
    files = _record_files(d.path)
  elif d.source == "tfds":
    builder = _tfds_builder(cfg)
    try:
      instr = builder.info.splits[d.split].file_instructions
    except (KeyError, ValueError) as e:
      raise ConfigError(f"tfds dataset {d.path!r} has no split data.split={d.split!r}: {e}") from None
    feat = builder.info.features[d.audio_key]
    rate = int(getattr(feat, "sample_rate", None) or d.sample_rate)
    if rate != d.sample_rate and d.on_bad_rate == "error":
      raise _rate_error(f"tfds dataset {d.path!r} feature {d.audio_key!r}", rate, cfg)
  else:
    raise ConfigError(f"data.source={d.source!r} must be one of {SOURCES}")
  file_ids, offsets, sizes, names = [], [], [], []
  if d.source == "tfrecord":
    plan = [(f, 0, -1) for f in files]
  else:
    plan = [(os.path.join(builder.data_dir, os.path.basename(i.filename)), i.skip, i.take) for i in instr]
  for f, skip, take in plan:
    try:
      recs = _record_offsets(f)
    except (ValueError, OSError, tf.errors.OpError) as e:
      raise ConfigError(str(e) if str(f) in str(e) else f"{f}: {e}") from None
    recs = recs[skip:] if take < 0 else recs[skip:skip + take]
    if f not in names:
      names.append(f)
    fid = names.index(f)
    for off, n in recs:
      file_ids.append(fid)
      offsets.append(off)
      sizes.append(n)
  if not offsets:
    raise ConfigError(f"data.path={d.path!r} ({d.source}) holds no records")
  out = dict(kind=d.source, paths=np.array(names), file_ids=np.array(file_ids, np.int32),
             offsets=np.array(offsets, np.int64), sizes=np.array(sizes, np.int64))
  if d.source == "tfrecord":
    out["record_kind"], out["has_rate"] = _probe_record(cfg, names[0], offsets[0], sizes[0])
  else:
    out["rate"] = rate
  return out


def _read_record(path: str, offset: int, size: int) -> bytes:
  with tf.io.gfile.GFile(path, "rb") as f:
    f.seek(offset)
    data = f.read(size)
  if len(data) != size:
    raise ValueError(f"{_MARK} TFRecord {path}: record at byte {offset} is truncated")
  return data


def _probe_record(cfg, path: str, offset: int, size: int) -> tuple[str, bool]:
  """Type of the audio feature ("bytes" | "float" | "int64") from the first record."""
  ex = tf.train.Example.FromString(_read_record(path, int(offset), int(size)))
  feats = ex.features.feature
  key = cfg.data.audio_key
  if key not in feats:
    raise ConfigError(f"TFRecord {path}: no feature data.audio_key={key!r} (features: {sorted(feats)})")
  kind = feats[key].WhichOneof("kind")
  return {"bytes_list": "bytes", "float_list": "float", "int64_list": "int64"}[kind], cfg.data.rate_key in feats


_INDEX_CACHE: dict = {}


def _index_key(cfg) -> str:
  d = cfg.data
  parts = [_INDEX_VERSION, d.source, d.path, d.split, d.audio_key, d.rate_key, d.sample_rate,
           d.on_bad_rate, d.min_samples]
  if d.get("on_bad_file", "error") != "error":  # keeps the keys of earlier runs' caches
    parts.append(d.on_bad_file)
  if d.source == "files":
    parts.append(list_files(d.path))
  elif d.source == "tfrecord":
    parts.append(_record_files(d.path))
  return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def index(cfg, workdir: str | None = None) -> dict:
  """The example index (built once, cached in memory and in WORKDIR/audio_index_<key>.npz)."""
  key = _index_key(cfg)
  if key in _INDEX_CACHE:
    return _INDEX_CACHE[key]
  path = os.path.join(workdir, f"audio_index_{key}.npz") if workdir else None
  idx = _load_npz(path)
  if idx is None:
    idx = _build_index(cfg)
    _save_npz(path, idx)
  _INDEX_CACHE[key] = idx
  return idx


def _load_npz(path: str | None) -> dict | None:
  if not path or not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path, "rb") as f:
    z = np.load(io.BytesIO(f.read()), allow_pickle=False)
    return {k: (z[k].item() if z[k].ndim == 0 else z[k]) for k in z.files}


def _save_npz(path: str | None, arrays: dict) -> None:
  if not path:
    return
  tf.io.gfile.makedirs(os.path.dirname(path))
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  tmp = f"{path}.tmp{os.getpid()}"
  with tf.io.gfile.GFile(tmp, "wb") as f:
    f.write(buf.getvalue())
  tf.io.gfile.rename(tmp, path, overwrite=True)


def example_lengths(cfg, workdir: str | None = None) -> np.ndarray:
  """int64 [N]: samples (at data.sample_rate) of every indexed example. Files: from the index
  headers. Records: their index has no lengths, so every record is decoded once (progress
  line; cached in memory and in WORKDIR/audio_lengths_<key>.npz); only bucketing needs it."""
  idx = index(cfg, workdir)
  if idx["kind"] == "files":
    return idx["lengths"]
  key = _index_key(cfg)
  if key + "/lengths" in _INDEX_CACHE:
    return _INDEX_CACHE[key + "/lengths"]
  path = os.path.join(workdir, f"audio_lengths_{key}.npz") if workdir else None
  cached = _load_npz(path)
  if cached is None:
    load = _load_fn(cfg, idx)
    n = num_examples(idx)
    ds = (tf.data.Dataset.range(n)
          .map(lambda i: tf.size(load(i)[0], out_type=tf.int64), num_parallel_calls=tf.data.AUTOTUNE,
               deterministic=True).batch(256))
    progress, chunks = _Progress("audio lengths", n, "records"), []
    try:
      for chunk in ds.as_numpy_iterator():
        chunks.append(chunk)
        progress(sum(map(len, chunks)))
    except tf.errors.OpError as e:
      raise ConfigError(f"{_clean_error(e)} (measuring record lengths for data.buckets)") from None
    progress.finish()
    cached = {"lengths": np.concatenate(chunks).astype(np.int64)}
    _save_npz(path, cached)
  _INDEX_CACHE[key + "/lengths"] = cached["lengths"]
  return cached["lengths"]


def num_examples(idx: dict) -> int:
  return len(idx["paths"]) if idx["kind"] == "files" else len(idx["offsets"])


# ---------------------------------------------------------------------------- decoding


def _resample(x: tf.Tensor, rate: tf.Tensor, target: int) -> tf.Tensor:
  """Lanczos-3 anti-aliased resize (TF only); used for 16-bit WAV at the wrong rate."""
  n = tf.cast(tf.math.ceil(tf.cast(tf.size(x), tf.float64) * target / tf.cast(rate, tf.float64)), tf.int32)
  y = tf.image.resize(x[None, :, None, None], tf.stack([n, 1]), method="lanczos3", antialias=True)
  return tf.reshape(y, [-1])


def _py_decode(data: bytes, rate: int, what: bytes) -> np.ndarray:
  try:
    return _ffmpeg_decode(data, int(rate))
  except ValueError as e:
    raise ValueError(f"{_MARK} audio {what.decode()} cannot be read: {e}") from None


def _decode_bytes(data, what, decoder, rate, cfg) -> tuple[tf.Tensor, tf.Tensor]:
  """Encoded file bytes -> (float32 mono samples, their rate)."""
  target = cfg.data.sample_rate
  ff_rate = target if cfg.data.on_bad_rate == "resample" else 0

  def tf_wav():
    x, r = tf.audio.decode_wav(data)
    return tf.reduce_mean(x, axis=1), r

  def ffmpeg():
    x = tf.numpy_function(_py_decode, [data, ff_rate, what], tf.float32, stateful=False)
    return tf.reshape(x, [-1]), tf.where(ff_rate > 0, ff_rate, rate)

  return tf.cond(tf.equal(decoder, _TF_WAV), tf_wav, ffmpeg)


def _check(x: tf.Tensor, rate: tf.Tensor, what: tf.Tensor, cfg) -> tf.Tensor:
  """Empty / wrong-rate checks with the source named; resamples when configured."""
  target = cfg.data.sample_rate
  empty = tf.debugging.Assert(tf.size(x) > 0, [_MARK, "audio", what, "has no samples"])
  with tf.control_dependencies([empty]):
    x = tf.identity(x)
  if cfg.data.on_bad_rate == "resample":
    return tf.cond(tf.equal(rate, target), lambda: x, lambda: _resample(x, rate, target))
  bad = tf.debugging.Assert(tf.equal(rate, target), [
      _MARK, "audio", what, "has sample rate", rate, f"Hz but data.sample_rate={target}: resample "
      "the data or set --config.data.on_bad_rate=resample"])
  with tf.control_dependencies([bad]):
    return tf.identity(x)


def _load_fn(cfg, idx: dict):
  """dataset index (int64 scalar) -> (float32 samples at cfg rate, name of the source)."""
  paths = tf.constant(idx["paths"])
  if idx["kind"] == "files":
    decoders = tf.constant(idx["decoders"].astype(np.int32))
    rates = tf.constant(idx["rates"])

    def load(i):
      path = paths[i]
      x, r = _decode_bytes(tf.io.read_file(path), path, decoders[i], rates[i], cfg)
      return _check(x, r, path, cfg), path
    return load

  file_ids, offsets, sizes = (tf.constant(idx[k]) for k in ("file_ids", "offsets", "sizes"))

  def read(i):
    path = paths[file_ids[i]]
    data = tf.numpy_function(lambda p, o, n: _read_record(p.decode(), int(o), int(n)),
                             [path, offsets[i], sizes[i]], tf.string, stateful=False)
    name = tf.strings.join([path, " (record at byte ", tf.strings.as_string(offsets[i]), ")"])
    return tf.reshape(data, []), name

  key = cfg.data.audio_key
  if idx["kind"] == "tfds":
    features = _tfds_builder(cfg).info.features
    rate = int(idx["rate"])

    def load(i):
      data, name = read(i)
      x = features.deserialize_example(data)[key]
      if x.dtype == tf.string:  # encoded audio (tfds lazy_decode datasets)
        x, r = _decode_bytes(x, name, _FFMPEG, rate, cfg)
      else:
        x, r = _to_float(x), tf.constant(rate)
        if x.shape.rank == 2:  # [samples, channels]
          x = tf.reduce_mean(x, axis=-1)
      return _check(x, r, name, cfg), name
    return load

  kind, has_rate = str(idx["record_kind"]), bool(idx["has_rate"])
  spec = {key: (tf.io.FixedLenFeature([], tf.string) if kind == "bytes" else
                tf.io.VarLenFeature(tf.float32 if kind == "float" else tf.int64))}
  if has_rate:
    spec[cfg.data.rate_key] = tf.io.FixedLenFeature([], tf.int64)

  def load(i):
    data, name = read(i)
    ex = tf.io.parse_single_example(data, spec)
    rate = tf.cast(ex[cfg.data.rate_key], tf.int32) if has_rate else tf.constant(cfg.data.sample_rate)
    if kind == "bytes":
      raw = ex[key]
      is_wav = tf.strings.substr(raw, 0, 4) == "RIFF"
      x, r = _decode_bytes(raw, name, tf.where(is_wav, _TF_WAV, _FFMPEG), rate, cfg)
    else:
      x, r = _to_float(tf.sparse.to_dense(ex[key])), rate
    return _check(x, r, name, cfg), name
  return load


def _to_float(x: tf.Tensor) -> tf.Tensor:
  if x.dtype.is_integer:
    return tf.cast(x, tf.float32) / 32768.0
  return tf.cast(x, tf.float32)


def normalize(x: tf.Tensor) -> tf.Tensor:
  """fairseq F.layer_norm(wav, wav.shape): zero mean, unit variance over the utterance."""
  mean, var = tf.nn.moments(x, axes=[0])
  return (x - mean) * tf.math.rsqrt(var + 1e-5)


def crop_pad(x: tf.Tensor, seed: tf.Tensor, max_samples: int) -> tuple[tf.Tensor, tf.Tensor]:
  """Random crop to max_samples (offset uniform over the valid starts), zero right-padding."""
  n = tf.shape(x)[0]
  span = tf.maximum(n - max_samples + 1, 1)
  start = tf.random.stateless_uniform([], seed, minval=0, maxval=2**31 - 1, dtype=tf.int32) % span
  x = x[start:start + max_samples]
  length = tf.shape(x)[0]
  return tf.pad(x, [[0, max_samples - length]]), length


# ---------------------------------------------------------------------------- pipeline


def frames(cfg, num_samples: int) -> int:
  return conv_output_length(int(num_samples), cfg.model.conv_kernels, cfg.model.conv_strides)


def mask_batch(cfg, audio_len: tf.Tensor, seed: tf.Tensor, num_samples: int | None = None) -> tf.Tensor:
  """v1: bool [b, T] span mask over the valid conv frames of each row, T = frames of
  num_samples (default data.max_samples); exact count per row (masking_audio.span_mask)."""
  d = cfg.data
  valid = conv_output_length(tf.cast(audio_len, tf.int32), cfg.model.conv_kernels, cfg.model.conv_strides)
  return span_mask(seed, valid, frames(cfg, num_samples or d.max_samples), mask_prob=d.mask_prob,
                   span=d.span, min_spans=d.min_spans, same_count=d.same_count)


def batch_masks(cfg, audio_len: tf.Tensor, seed: tf.Tensor, num_samples: int | None = None) -> dict:
  """The mask entries of a batch cropped to num_samples (module docstring): v1 {"mask" [b, T]};
  v2 {"mask" [b, M, T], "visible" [b, M, K]} (every row full: v2 batches are bucketed)."""
  s = int(num_samples or cfg.data.max_samples)
  if cfg.get("objective", "v1") != "v2":
    return {"mask": mask_batch(cfg, audio_len, seed, s)}
  t, v = frames(cfg, s), cfg.v2
  mask = block_mask_1d(seed, t, tf.shape(audio_len)[0], int(v.clone_batch), t,
                       mask_prob=float(v.mask_prob), adjust=float(v.mask_adjust),
                       length=int(v.mask_length))
  return {"mask": mask, "visible": masking_v2.visible_indices(mask, t - int(t * v.mask_prob))}


# --------------------------------------------------------------------------- buckets


def bucketed(cfg) -> bool:
  return len(cfg.data.get("buckets", ())) > 0


def crop_lengths(cfg) -> tuple[int, ...]:
  """Crop length (samples) of every bucket, ascending; the last is always data.max_samples
  (without buckets it is the only one, and shorter clips are padded to it)."""
  top = int(cfg.data.max_samples)
  return tuple(sorted({int(b) for b in cfg.data.get("buckets", ()) if 0 < int(b) < top} | {top}))


def batch_multiple(cfg) -> int:
  """What every bucket's global batch is a multiple of: data.batch_multiple, or (0) the
  number of devices, which every mesh's batch axes and the process count divide."""
  m = int(cfg.data.get("batch_multiple", 0))
  if m > 0:
    return m
  import jax
  return jax.device_count()


@dataclasses.dataclass(frozen=True)
class BucketPlan:
  """Which clips each bucket holds and its global batch (module docstring)."""
  crops: tuple[int, ...]       # crop length per bucket (samples), ascending
  batch: tuple[int, ...]       # global batch per bucket
  count: tuple[int, ...]       # clips per bucket
  per_epoch: tuple[int, ...]   # batches of each bucket per schedule epoch (0: bucket unused)
  members: np.ndarray          # int64 clip indices, grouped by bucket (bucket 0 first)
  bucket: np.ndarray           # int32 [N] bucket of every clip, -1 = left out (too short)
  padded: bool                 # no buckets: one crop length, shorter clips padded

  @property
  def offsets(self) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(self.count)]).astype(np.int64)

  @property
  def active(self) -> list[int]:
    return [k for k, n in enumerate(self.per_epoch) if n > 0]


def make_plan(lengths, crops, batch_size: int, multiple: int, *, padded: bool = False) -> BucketPlan:
  """Bucket assignment of clips of `lengths` samples for crop lengths `crops` (ascending; the
  last is the largest bucket, whose batch is batch_size). padded: a single crop length that
  takes every clip (shorter ones padded)."""
  lengths = np.asarray(lengths, np.int64)
  crops = tuple(int(c) for c in crops)
  nb, m = len(crops), int(multiple)
  if padded:
    if nb != 1:
      raise ValueError(f"padded batches have one crop length, got {crops}")
    bucket, batch = np.zeros(len(lengths), np.int32), (int(batch_size),)
  else:
    bucket = (np.searchsorted(np.asarray(crops), lengths, side="right") - 1).astype(np.int32)
    batch = tuple(int(batch_size) if k == nb - 1 else max(m, batch_size * crops[-1] // c // m * m)
                  for k, c in enumerate(crops))
    # A bucket with fewer clips than one batch would repeat clips inside its batches: its
    # clips join the next smaller bucket instead (cropped shorter). The smallest bucket then
    # gets a smaller batch (a multiple of m), or its clips are left out when under m, unless
    # it is the only bucket in use (order.py's wrap-around then applies).
    for k in range(nb - 1, 0, -1):
      here = bucket == k
      if 0 < here.sum() < batch[k]:
        bucket[here] = k - 1
    n0 = int((bucket == 0).sum())
    if 0 < n0 < batch[0] and (bucket > 0).any():
      if n0 >= m:
        batch = (n0 // m * m,) + batch[1:]
      else:
        bucket[bucket == 0] = -1
  count = tuple(int((bucket == k).sum()) for k in range(nb))
  per_epoch = tuple(max(1, int(np.floor(n / b + 0.5))) if n else 0 for n, b in zip(count, batch))
  members = np.concatenate([np.flatnonzero(bucket == k) for k in range(nb)]).astype(np.int64)
  return BucketPlan(crops, batch, count, per_epoch, members, bucket, padded)


def plan_stats(lengths, plan: BucketPlan) -> dict:
  """Shares of a plan when every kept clip is read equally often: padded_fraction = padding /
  all samples of the batches (~ padded frames / frames), cropped_fraction = audio the crops
  cut away / audio of the kept clips; left_out = clips in no bucket; shapes = batch shapes."""
  lengths = np.asarray(lengths, np.int64)
  keep = plan.bucket >= 0
  crop = np.asarray(plan.crops, np.int64)[plan.bucket[keep]]
  real = np.minimum(lengths[keep], crop)
  return {"padded_fraction": float(1 - real.sum() / max(crop.sum(), 1)),
          "cropped_fraction": float(1 - real.sum() / max(lengths[keep].sum(), 1)),
          "left_out": int((~keep).sum()), "shapes": len(plan.active)}


def bucket_plan(cfg, workdir: str | None = None) -> BucketPlan:
  """The plan of this config's data (index + lengths) and buckets."""
  idx = index(cfg, workdir)
  if not bucketed(cfg):
    return make_plan(np.zeros(num_examples(idx)), crop_lengths(cfg), cfg.batch_size, 1, padded=True)
  plan = make_plan(example_lengths(cfg, workdir), crop_lengths(cfg), cfg.batch_size, batch_multiple(cfg))
  if not plan.active:
    raise ConfigError(f"data.path={cfg.data.path!r}: no clip is as long as the smallest bucket "
                      f"(data.buckets -> {crop_lengths(cfg)} samples); lower the buckets")
  return plan


def _step_fns(cfg, plan: BucketPlan, process_index: int, process_count: int):
  """TensorFlow functions of the step: bucket_of(step) -> int32 [] and ids(step) -> int64 [b]
  (this process's clips of global batch `step`); pure functions of (cfg.seed, step,
  process_index), O(1) at any step (module docstring)."""
  for k in plan.active:
    if plan.batch[k] % process_count:
      raise ConfigError(f"the global batch {plan.batch[k]} of bucket {plan.crops[k]} samples is not "
                        f"divisible by process_count={process_count}: set data.batch_multiple (and "
                        "batch_size) to a multiple of it")
  members = tf.constant(plan.members)
  offsets = plan.offsets
  active = plan.active
  if len(active) == 1:  # exactly order.py's order (the order of unbucketed runs)
    k = active[0]
    kw = dict(num_examples=plan.count[k], global_batch=plan.batch[k], seed=cfg.seed,
              process_index=process_index, process_count=process_count)
    return (lambda step: tf.constant(k, tf.int32),
            lambda step: tf.gather(members, offsets[k] + order.example_indices(step, **kw)))

  per_epoch = tf.constant(plan.per_epoch, tf.int64)
  ends = tf.constant(np.cumsum(plan.per_epoch), tf.int64)
  total = int(sum(plan.per_epoch))
  batch = tf.constant(plan.batch, tf.int64)
  count = tf.constant(plan.count, tf.int64)
  first = tf.constant(offsets[:-1], tf.int64)
  seed = tf.constant(cfg.seed, tf.int64)

  def slot(step):
    """(bucket, j): step is batch j of its bucket's stream. Schedule epoch e holds per_epoch[k]
    batches of bucket k, in a seeded order; they are batches e * per_epoch[k] + [0, per_epoch[k])."""
    step = tf.cast(step, tf.int64)
    epoch = step // total
    q = tf.raw_ops.RandomIndexShuffle(
        index=step % total, seed=tf.stack([seed, epoch, tf.constant(_SCHED_SALT, tf.int64)]),
        max_index=tf.constant(total - 1, tf.int64), rounds=4)
    k = tf.searchsorted(ends, q[None], side="right", out_type=tf.int64)[0]
    return k, epoch * per_epoch[k] + q - (ends[k] - per_epoch[k])

  def bucket_of(step):
    return tf.cast(slot(step)[0], tf.int32)

  def ids(step):
    # Batch j of bucket k is slice j mod q of pass j div q over a fresh permutation of its n
    # clips, q = n div b whole batches per pass: a batch never holds a clip twice (process
    # shards are disjoint); the n mod b clips a pass skips differ from pass to pass.
    k, j = slot(step)
    b = batch[k] // process_count
    n = count[k]
    q = n // batch[k]
    g = (j % q) * batch[k] + process_index * b + tf.range(b)
    seeds = tf.stack([tf.fill([b], seed), tf.fill([b], j // q), tf.fill([b], _BUCKET_SALT + k)], axis=1)
    local = tf.raw_ops.RandomIndexShuffle(index=g, seed=seeds, max_index=n - 1, rounds=4)
    return tf.gather(members, first[k] + local)

  return bucket_of, ids


def batch_indices(cfg, workdir: str | None, step: int, *, process_index: int = 0,
                  process_count: int = 1) -> tuple[int, np.ndarray]:
  """(crop length in samples, clip indices) of one process's share of batch `step`."""
  plan = bucket_plan(cfg, workdir)
  bucket_of, ids = _step_fns(cfg, plan, process_index, process_count)
  return plan.crops[int(bucket_of(step))], ids(step).numpy()


def tf_dataset(cfg: ml_collections.ConfigDict, workdir: str | None, *, start_step: int,
               process_index: int, process_count: int) -> tf.data.Dataset:
  """Infinite tf.data pipeline of per-process batches (+ "step") from start_step on."""
  idx = index(cfg, workdir)
  plan = bucket_plan(cfg, workdir)
  bucket_of, batch_ids = _step_fns(cfg, plan, process_index, process_count)
  load = _load_fn(cfg, idx)
  d = cfg.data
  crops = tf.constant(plan.crops, tf.int32)
  local_batch = tf.constant([b // process_count for b in plan.batch], tf.int64)
  # The functions below use TF control flow only: autograph would spend seconds (per bucket
  # branch) re-writing the masking code at every pipeline build.
  plain = tf.autograph.experimental.do_not_convert

  @plain
  def examples(step):
    ids = batch_ids(step)
    n = tf.size(ids, out_type=tf.int64)
    return tf.data.Dataset.from_tensor_slices(
        (tf.fill([n], step), tf.fill([n], bucket_of(step)), tf.range(n), ids))

  @plain
  def example(step, k, j, i):
    x, _ = load(i)
    if d.normalize:
      x = normalize(x)
    seed = tf.random.experimental.stateless_fold_in(
        order.batch_seed(cfg.seed, step, process_index, _CROP_SALT), j)
    audio, length = crop_pad(x, seed, crops[k])
    return {"audio": audio, "audio_len": length, "step": step}

  # Static mask shapes per bucket (T, K): one switch branch per bucket in use.
  active = plan.active
  branch = tf.constant([active.index(k) if k in active else 0 for k in range(len(plan.crops))])

  @plain
  def masked(batch):
    step = batch["step"][0]
    seed = order.batch_seed(cfg.seed, step, process_index, _MASK_SALT)
    fns = [lambda s=plan.crops[k]: batch_masks(cfg, batch["audio_len"], seed, s) for k in active]
    masks = fns[0]() if len(fns) == 1 else tf.switch_case(branch[bucket_of(step)], fns)
    audio = batch["audio"]
    if len(active) == 1:
      audio = tf.ensure_shape(audio, [None, plan.crops[active[0]]])
    return {"audio": audio, "audio_len": batch["audio_len"], **masks, "step": step}

  opts = tf.data.Options()
  opts.deterministic = True
  threads = max(int(d.get("threads", 0)), 0)
  if threads:
    opts.threading.private_threadpool_size = threads
    opts.threading.max_intra_op_parallelism = 1
    opts.autotune.cpu_budget = threads
  # One window per step: its b examples arrive in order (deterministic map) and form one
  # batch, whatever the bucket's batch size.
  return (tf.data.Dataset.counter(start_step, dtype=tf.int64).flat_map(examples)
          .map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
          .group_by_window(key_func=plain(lambda ex: ex["step"]),
                           reduce_func=plain(lambda _, w: w.batch(int(max(plan.batch)))),
                           window_size_func=plain(lambda step: tf.gather(local_batch, bucket_of(step))))
          .map(masked, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
          .prefetch(2).with_options(opts))


def _clean_error(e: tf.errors.OpError) -> str:
  """One line out of a TF error: our tagged message if there is one."""
  msg = e.message
  m = re.search(re.escape(_MARK) + r"\]?\s*(.*)", msg)
  if m:
    line = m.group(1).splitlines()[0]
    line = re.sub(r"\[([^\]]*)\]", r"\1", line)     # tf.debugging.Assert wraps each item in []
    line = re.sub(r"\s*\[Op:.*$|\s*\{\{.*$", "", line).replace(" ,", ",")
    return line.replace("  ", " ").strip()
  return re.sub(r"\{\{function_node [^}]*\}\}\s*", "", msg).splitlines()[0]


def _find_bad(cfg, workdir: str | None, step: int, process_index: int,
              process_count: int) -> str | None:
  """Decodes the files of one batch in Python to name the one TensorFlow choked on."""
  idx = index(cfg, workdir)
  if idx["kind"] != "files":
    return None
  _, ids = batch_indices(cfg, workdir, step, process_index=process_index, process_count=process_count)
  for i in ids:
    path = str(idx["paths"][i])
    try:
      if idx["decoders"][i] == _TF_WAV:
        with tf.io.gfile.GFile(path, "rb") as f, wave.open(f) as w:
          w.readframes(w.getnframes())
          if w.getnframes() == 0:
            return f"audio file {path} has no samples"
    except (wave.Error, EOFError, OSError, struct.error) as e:
      return f"audio file {path} cannot be decoded: {e}"
  return None


def build_dataset(cfg: ml_collections.ConfigDict, workdir: str, *, start_step: int,
                  process_index: int, process_count: int) -> Iterator[dict]:
  """Per-process numpy batches for steps start_step, ...: {"audio", "audio_len", "mask"}
  (+ "visible" for objective v2), shapes per bucket (module docstring).

  A decoding error becomes one ValueError naming the file (and the step)."""
  ds = tf_dataset(cfg, workdir, start_step=start_step, process_index=process_index,
                  process_count=process_count)
  step = start_step
  it = ds.as_numpy_iterator()
  while True:
    try:
      batch = next(it)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      msg = _clean_error(e)
      if _MARK not in e.message:
        msg = _find_bad(cfg, workdir, step, process_index, process_count) or msg
      raise ValueError(f"{msg} (batch of step {step})") from None
    step = int(batch.pop("step")) + 1
    yield batch


def example_batch(cfg: ml_collections.ConfigDict, batch_size: int) -> dict:
  """Zero audio at the largest bucket (data.max_samples) with fixed masks: the batch structure
  and shapes for init / compilation (other buckets differ only in b, S, T and K)."""
  s = int(cfg.data.max_samples)
  masks = batch_masks(cfg, tf.fill([batch_size], s), tf.constant([0, 0], tf.int64), s)
  return {"audio": np.zeros((batch_size, s), np.float32),
          "audio_len": np.full((batch_size,), s, np.int32),
          **{k: v.numpy() for k, v in masks.items()}}


def prepare(cfg: ml_collections.ConfigDict, workdir: str) -> None:
  """Builds (or loads) the example index; nothing in the config depends on the data."""
  validate(cfg)
  index(cfg, workdir)


def resolve_offline(cfg: ml_collections.ConfigDict, workdir: str) -> None:
  """Model keys without reading the data: no audio config value depends on the data."""
  del cfg, workdir


def validate(cfg: ml_collections.ConfigDict) -> None:
  m, d = cfg.model, cfg.data
  n = len(m.conv_dims)
  t = frames(cfg, d.max_samples) if len(m.conv_kernels) == len(m.conv_strides) == n else 0
  receptive = receptive_field(m.conv_kernels, m.conv_strides)[1]
  checks = [
      (len(m.conv_kernels) == n and len(m.conv_strides) == n,
       f"model.conv_dims / conv_kernels / conv_strides must have the same length "
       f"(got {len(m.conv_dims)}, {len(m.conv_kernels)}, {len(m.conv_strides)})"),
      (m.conv_norm in ("layer", "group", "none"), f"model.conv_norm={m.conv_norm!r} must be layer, group or none"),
      (m.pos_conv in ("data2vec", "wav2vec2"), f"model.pos_conv={m.pos_conv!r} must be data2vec or wav2vec2"),
      (m.encoder.hidden % m.pos_conv_groups == 0,
       f"model.encoder.hidden={m.encoder.hidden} is not divisible by model.pos_conv_groups={m.pos_conv_groups}"),
      (m.pos_conv_depth >= 1 and m.pos_conv_kernel >= 1, "model.pos_conv_depth and pos_conv_kernel must be >= 1"),
      (d.source in SOURCES, f"data.source={d.source!r} must be one of {SOURCES}"),
      (bool(d.path), "data.path is empty: set a glob of audio files / TFRecords or a tfds name"),
      (d.on_bad_rate in ("error", "resample"), f"data.on_bad_rate={d.on_bad_rate!r} must be error or resample"),
      (d.sample_rate > 0, f"data.sample_rate={d.sample_rate} must be > 0"),
      (d.max_samples >= receptive,
       f"data.max_samples={d.max_samples} is shorter than the conv receptive field ({receptive} samples)"),
      (0 <= d.min_samples <= d.max_samples, f"data.min_samples={d.min_samples} must be in [0, data.max_samples]"),
      (0.0 <= d.mask_prob <= 1.0, f"data.mask_prob={d.mask_prob} must be in [0, 1]"),
      (1 <= d.span <= max(t, 1), f"data.span={d.span} must be in [1, frames of max_samples={t}]"),
      (d.min_spans >= 0, f"data.min_spans={d.min_spans} must be >= 0"),
      (all(int(b) > 0 for b in d.get("buckets", ())), f"data.buckets={tuple(d.get('buckets', ()))} "
       "must be positive sample counts"),
      (min(crop_lengths(cfg)) >= receptive,
       f"data.buckets={tuple(d.get('buckets', ()))}: bucket {min(crop_lengths(cfg))} is shorter than "
       f"the conv receptive field ({receptive} samples)"),
      (int(d.get("batch_multiple", 0)) >= 0, f"data.batch_multiple={d.get('batch_multiple')} must be >= 0"),
      (d.get("on_bad_file", "error") in ("error", "skip"),
       f"data.on_bad_file={d.get('on_bad_file')!r} must be error or skip"),
  ]
  if cfg.get("objective", "v1") == "v2":
    v, t_min = cfg.v2, frames(cfg, min(crop_lengths(cfg))) if checks[0][0] else 0
    checks += [
        (bucketed(cfg), "objective=v2 needs length buckets (set data.buckets): its masks keep a "
         "static number of visible frames, which padded rows would break"),
        (v.clone_batch >= 1, f"v2.clone_batch={v.clone_batch} must be >= 1"),
        (0.0 < v.mask_prob < 1.0, f"v2.mask_prob={v.mask_prob} must be in (0, 1)"),
        (v.mask_adjust >= 0.0, f"v2.mask_adjust={v.mask_adjust} must be >= 0"),
        (1 <= v.mask_length <= max(t_min, 1),
         f"v2.mask_length={v.mask_length} must be in [1, frames of the smallest bucket={t_min}]"),
    ]
  for ok, msg in checks:
    if not ok:
      raise ConfigError(msg)
  if d.source == "files" and shutil.which("ffmpeg") is None and "wav" not in d.path.lower():
    raise ConfigError("ffmpeg is not installed (apt-get install ffmpeg); it decodes FLAC and other "
                      "non-WAV audio for data.source=files")


# --------------------------------------------------------------------------- benchmark


def throughput(cfg: ml_collections.ConfigDict, workdir: str | None, *, batches: int = 20,
               threads: int = 1) -> dict:
  """Seconds of (real, unpadded) audio per wall-clock second through index lookup, decode,
  normalise, crop, pad and mask, on `threads` host threads (the index build is not timed)."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.data.threads = threads
  index(cfg, workdir)
  it = tf_dataset(cfg, workdir, start_step=0, process_index=0, process_count=1).as_numpy_iterator()
  next(it)  # warm-up: graph tracing
  t0, stats = time.perf_counter(), BatchStats(cfg)
  for _ in range(batches):
    stats.add(next(it))
  dt = time.perf_counter() - t0
  return {"audio_seconds_per_second": stats.audio_seconds / dt,
          "padded_fraction": stats.padded_fraction, "shapes": len(stats.shapes),
          "batches": batches, "seconds": dt, "threads": threads}


class BatchStats:
  """Running totals over audio batches: batches, examples, mask positions, real (unpadded)
  seconds, padded share of the conv frames (what the encoder computes on), batch shapes."""

  def __init__(self, cfg):
    self.cfg, self.real_samples, self.real_frames, self.frames = cfg, 0, 0, 0
    self.batches, self.examples, self.positions = 0, 0, 0
    self.shapes: set = set()

  def add(self, batch: dict) -> None:
    b, s = batch["audio"].shape
    m = self.cfg.model
    self.batches += 1
    self.examples += b
    self.positions += batch["mask"].size
    self.real_samples += int(batch["audio_len"].sum())
    self.real_frames += int(conv_output_length(batch["audio_len"].astype(np.int64), m.conv_kernels,
                                               m.conv_strides).sum())
    self.frames += b * frames(self.cfg, s)
    self.shapes.add((b, s))

  @property
  def audio_seconds(self) -> float:
    return self.real_samples / self.cfg.data.sample_rate

  @property
  def padded_fraction(self) -> float:
    return 1.0 - self.real_frames / max(self.frames, 1)


# ------------------------------------------------------------------ labelled probe sets


def load_clip(path: str, cfg) -> tuple[np.ndarray, int]:
  """Eval preprocessing: mono at data.sample_rate, per-utterance normalisation
  (data.normalize), the first data.max_samples samples, zero right-padding."""
  rate = int(cfg.data.sample_rate)
  with open(path, "rb") as f:
    data = f.read()
  x = None
  if data[:4] == b"RIFF":
    try:
      wav, r = tf.audio.decode_wav(data)
      if int(r) == rate:
        x = tf.reduce_mean(wav, axis=1)
    except tf.errors.OpError:
      x = None  # not 16-bit PCM: ffmpeg below
  if x is None:
    try:
      x = tf.constant(_ffmpeg_decode(data, rate))
    except ValueError as e:
      raise ConfigError(f"audio {path}: {e}") from None
  if int(tf.size(x)) == 0:
    raise ConfigError(f"audio {path} has no samples")
  if cfg.data.normalize:
    x = normalize(x)
  x = x.numpy()[: int(cfg.data.max_samples)].astype(np.float32)
  n = len(x)
  return np.pad(x, (0, int(cfg.data.max_samples) - n)), n


def labelled_set(cfg, workdir: str | None, path: str) -> labelled.LabelledSet:
  """A folder per class of audio files (the trainer's list_files: every extension it reads),
  each preprocessed by load_clip (python -m d2v_jax.probe)."""
  del workdir
  files, names = labelled.class_folders(path, EXTENSIONS, lister=list_files)
  clips = [load_clip(f, cfg) for f in files]
  labels, classes = labelled.label_ids(names)
  arrays = {"audio": np.stack([c[0] for c in clips]),
            "audio_len": np.asarray([c[1] for c in clips], np.int32),
            "mask": np.zeros((len(files), frames(cfg, cfg.data.max_samples)), bool)}
  return labelled.LabelledSet(arrays, labels, classes, files)


def _main() -> None:  # python -m d2v_jax.data.audio configs/audio.py:variant=tiny,runlocal [threads]
  import sys
  from d2v_jax import config as config_lib
  cfg = config_lib.load_file(sys.argv[1])
  with tempfile.TemporaryDirectory() as tmp:
    print(json.dumps(throughput(cfg, tmp, threads=int(sys.argv[2]) if len(sys.argv) > 2 else 1)))


if __name__ == "__main__":
  _main()
