"""Audio input for data2vec-audio: index, decode, normalise, crop, pad, span-mask.

Sources (cfg.data.source), all read with tf.data by random access so that batch `s` of
process `p` is a pure function of (cfg.seed, s, p) (d2v_jax/data/order.py; O(1) resume):
  "files"     comma-separated globs (or a directory: its **/*.wav and **/*.flac). 16-bit PCM
              WAV decodes in TensorFlow (tf.audio.decode_wav); FLAC and any other format go
              through the `ffmpeg` binary (Debian package; no Python audio library needed).
  "tfrecord"  globs of uncompressed TFRecord files of tf.train.Example with feature
              cfg.data.audio_key: bytes (an encoded audio file), float (samples) or int64
              (int16 samples); optional int64 feature cfg.data.rate_key (sample rate).
  "tfds"      a prepared tfds dataset (name or directory; never downloaded), split
              cfg.data.split, audio feature cfg.data.audio_key (LibriSpeech: "speech", int16),
              stored as TFRecord (the tfds default).
An index is built once at start-up (WAV/FLAC headers, ffprobe for other formats; TFRecord
record offsets) and cached in WORKDIR/audio_index_<hash>.npz.

Per example (fairseq RawAudioDataset, ALGORITHM.md §2.3): mono (channels averaged), at
cfg.data.sample_rate (a file at another rate is an error naming it, or is resampled when
data.on_bad_rate="resample": ffmpeg's resampler, or a Lanczos-3 anti-aliased resize in TF
for WAV), normalised over the whole utterance like F.layer_norm(wav, wav.shape) (zero mean,
unit variance, eps 1e-5), then a random crop of data.max_samples (seeded per example), right
padded with zeros. Files shorter than data.min_samples are left out of the index ("files"
only; fairseq min_sample_size); record sources keep every record.

Batch (numpy): "audio" float32 [b, max_samples], "audio_len" int32 [b] (real samples),
"mask" bool [b, T] with T = conv frames of max_samples: span masks on the valid frames
(d2v_jax/data/masking_audio.py). Batches have one static shape: no length bucketing (jit
compiles once); the padding is hidden from the model by audio_len.

Bad input: an unreadable, empty, wrong-rate or too-short file raises one ValueError /
ConfigError line that names its path (at indexing, or while reading for corrupt payloads).
"""

from __future__ import annotations

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
from d2v_jax.data import order
from d2v_jax.data.masking_audio import conv_output_length, span_mask

SOURCES = ("files", "tfrecord", "tfds")
_MASK_SALT = 0xA0D10     # mask stream, apart from the order and crop streams (same cfg.seed)
_CROP_SALT = 0xC0C0
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


def _glob(pattern: str) -> list[str]:
  files: set[str] = set()
  for p in (s.strip() for s in pattern.split(",")):
    if not p:
      continue
    if tf.io.gfile.isdir(p):
      for ext in ("wav", "flac", "WAV", "FLAC"):
        files.update(tf.io.gfile.glob(os.path.join(p, "**", f"*.{ext}")))
        files.update(tf.io.gfile.glob(os.path.join(p, f"*.{ext}")))
    else:
      files.update(tf.io.gfile.glob(p))
  if not files:
    raise ConfigError(f"data.path={pattern!r} matches no file; check the glob")
  return sorted(files)


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


def _build_index(cfg) -> dict:
  d = cfg.data
  if d.source == "files":
    paths, lens, rates, decs, short = [], [], [], [], 0
    for p in _glob(d.path):
      try:
        rate, ch, frames, dec = _file_info(p)
      except (ValueError, struct.error, OSError, tf.errors.OpError) as e:
        raise ConfigError(f"audio file {p} cannot be read: {e}") from None
      if frames <= 0:
        raise ConfigError(f"audio file {p} has no samples; remove it or fix data.path")
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
    if not paths:
      raise ConfigError(f"data.path={d.path!r}: all {short} files are shorter than "
                        f"data.min_samples={d.min_samples}; lower it")
    return dict(kind="files", paths=np.array(paths), lengths=np.array(lens, np.int64),
                rates=np.array(rates, np.int32), decoders=np.array(decs, np.int8),
                skipped_short=short)
  if d.source == "tfrecord":
    files = _glob(d.path)
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
  if d.source in ("files", "tfrecord"):
    parts.append(_glob(d.path))
  return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def index(cfg, workdir: str | None = None) -> dict:
  """The example index (built once, cached in memory and in WORKDIR/audio_index_<key>.npz)."""
  key = _index_key(cfg)
  if key in _INDEX_CACHE:
    return _INDEX_CACHE[key]
  path = os.path.join(workdir, f"audio_index_{key}.npz") if workdir else None
  idx = None
  if path and tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path, "rb") as f:
      z = np.load(io.BytesIO(f.read()), allow_pickle=False)
      idx = {k: (z[k].item() if z[k].ndim == 0 else z[k]) for k in z.files}
  if idx is None:
    idx = _build_index(cfg)
    if path:
      tf.io.gfile.makedirs(workdir)
      buf = io.BytesIO()
      np.savez(buf, **idx)
      tmp = f"{path}.tmp{os.getpid()}"
      with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(buf.getvalue())
      tf.io.gfile.rename(tmp, path, overwrite=True)
  _INDEX_CACHE[key] = idx
  return idx


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


def mask_batch(cfg, audio_len: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """bool [b, T] span mask over the valid conv frames of each row."""
  d = cfg.data
  valid = conv_output_length(tf.cast(audio_len, tf.int32), cfg.model.conv_kernels, cfg.model.conv_strides)
  return span_mask(seed, valid, frames(cfg, d.max_samples), mask_prob=d.mask_prob, span=d.span,
                   min_spans=d.min_spans, same_count=d.same_count)


def tf_dataset(cfg: ml_collections.ConfigDict, workdir: str | None, *, start_step: int,
               process_index: int, process_count: int) -> tf.data.Dataset:
  """Infinite tf.data pipeline of per-process batches (+ "step") from start_step on."""
  idx = index(cfg, workdir)
  b = order.per_process_batch(cfg.batch_size, process_count)
  load = _load_fn(cfg, idx)
  d = cfg.data
  ds = order.index_batches(num_examples(idx), cfg.batch_size, seed=cfg.seed, start_step=start_step,
                           process_index=process_index, process_count=process_count)
  ds = ds.flat_map(lambda step, ids: tf.data.Dataset.from_tensor_slices(
      (tf.fill([b], step), tf.range(b, dtype=tf.int64), ids)))

  def example(step, j, i):
    x, _ = load(i)
    if d.normalize:
      x = normalize(x)
    seed = tf.random.experimental.stateless_fold_in(
        order.batch_seed(cfg.seed, step, process_index, _CROP_SALT), j)
    audio, length = crop_pad(x, seed, d.max_samples)
    return {"audio": tf.ensure_shape(audio, [d.max_samples]), "audio_len": length, "step": step}

  def masked(batch):
    seed = order.batch_seed(cfg.seed, batch["step"][0], process_index, _MASK_SALT)
    return {"audio": batch["audio"], "audio_len": batch["audio_len"],
            "mask": mask_batch(cfg, batch["audio_len"], seed), "step": batch["step"][0]}

  opts = tf.data.Options()
  opts.deterministic = True
  threads = max(int(d.get("threads", 0)), 0)
  if threads:
    opts.threading.private_threadpool_size = threads
    opts.threading.max_intra_op_parallelism = 1
    opts.autotune.cpu_budget = threads
  return (ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
          .batch(b, drop_remainder=True)
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


def _find_bad(cfg, idx: dict, step: int, process_index: int, process_count: int) -> str | None:
  """Decodes the files of one batch in Python to name the one TensorFlow choked on."""
  if idx["kind"] != "files":
    return None
  ids = order.example_indices(step, num_examples=num_examples(idx), global_batch=cfg.batch_size,
                              seed=cfg.seed, process_index=process_index,
                              process_count=process_count).numpy()
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
  """Per-process numpy batches {"audio", "audio_len", "mask"} for steps start_step, ...

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
        msg = _find_bad(cfg, index(cfg, workdir), step, process_index, process_count) or msg
      raise ValueError(f"{msg} (batch of step {step})") from None
    step = int(batch.pop("step")) + 1
    yield batch


def example_batch(cfg: ml_collections.ConfigDict, batch_size: int) -> dict:
  """Zero audio of full length with a fixed span mask: shapes for init / compilation."""
  s = int(cfg.data.max_samples)
  length = tf.fill([batch_size], s)
  mask = mask_batch(cfg, length, tf.constant([0, 0], tf.int64)).numpy()
  return {"audio": np.zeros((batch_size, s), np.float32),
          "audio_len": np.full((batch_size,), s, np.int32), "mask": mask}


def prepare(cfg: ml_collections.ConfigDict, workdir: str) -> None:
  """Builds (or loads) the example index; nothing in the config depends on the data."""
  validate(cfg)
  index(cfg, workdir)


def validate(cfg: ml_collections.ConfigDict) -> None:
  m, d = cfg.model, cfg.data
  n = len(m.conv_dims)
  t = frames(cfg, d.max_samples) if len(m.conv_kernels) == len(m.conv_strides) == n else 0
  receptive = 1
  for k, s in reversed(list(zip(m.conv_kernels, m.conv_strides))):
    receptive = (receptive - 1) * s + k
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
  t0, samples = time.perf_counter(), 0
  for _ in range(batches):
    samples += int(next(it)["audio_len"].sum())
  dt = time.perf_counter() - t0
  audio_s = samples / cfg.data.sample_rate
  return {"audio_seconds_per_second": audio_s / dt, "batches": batches, "seconds": dt,
          "threads": threads}


def _main() -> None:  # python -m d2v_jax.data.audio configs/audio.py:variant=tiny,runlocal [threads]
  import sys
  from d2v_jax import config as config_lib
  cfg = config_lib.load_file(sys.argv[1])
  with tempfile.TemporaryDirectory() as tmp:
    print(json.dumps(throughput(cfg, tmp, threads=int(sys.argv[2]) if len(sys.argv) > 2 else 1)))


if __name__ == "__main__":
  _main()
