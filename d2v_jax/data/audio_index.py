"""The audio example index, built once at start-up and cached: per file its length, rate and
decoder (WAV / FLAC headers, ffprobe for other formats), per TFRecord / tfds record its
offset and size, with a progress line every PROGRESS_SECONDS on process 0. Cached in memory
and in WORKDIR/audio_index_<hash>.npz. Unreadable files: data.on_bad_file (error | skip)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import subprocess
import shutil
import time

import jax
import numpy as np
import tensorflow as tf

from d2v_jax.config import ConfigError
from d2v_jax.data import sources

# Audio formats a directory in data.path (or a probe folder) is searched for; ffmpeg decodes
# all of them (16-bit WAV also decodes in TensorFlow).
EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".m4a")
PROGRESS_SECONDS = 5.0   # indexing progress line interval (process 0)
_MARK = "d2v_audio:"     # tags our messages inside TensorFlow errors
_HEAD_BYTES = 1 << 16
_INDEX_VERSION = 1
# decoders
TF_WAV, FFMPEG = 0, 1


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
  wav = ffmpeg_decode(data, rate=0)
  out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries",
                        "stream=sample_rate,channels", "-of", "json", "pipe:0"],
                       input=data, capture_output=True, check=False)
  info = json.loads(out.stdout or b"{}").get("streams", [{}])[0]
  return int(info.get("sample_rate", 0)), int(info.get("channels", 1)), len(wav)


def ffmpeg_decode(data: bytes, rate: int) -> np.ndarray:
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
    return rate, ch, frames, TF_WAV if tf_ok else FFMPEG
  if head[:4] == b"fLaC":
    rate, ch, frames = _flac_info(head)
    if frames > 0:
      return rate, ch, frames, FFMPEG
  with tf.io.gfile.GFile(path, "rb") as f:
    rate, ch, frames = _ffprobe(f.read())
  return rate, ch, frames, FFMPEG


def list_files(path: str) -> list[str]:
  """Audio files of comma-separated globs and/or directories, sorted. A glob keeps whatever
  it matches; a directory gives every file below it with an extension in EXTENSIONS (any
  case). ConfigError when nothing matches."""
  return sources.expand(path, "audio file", lambda n: os.path.splitext(n)[1].lower() in EXTENSIONS)


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


def rate_error(what: str, rate: int, cfg) -> ConfigError:
  return ConfigError(f"{what} has sample rate {rate} Hz but data.sample_rate={cfg.data.sample_rate}: "
                     "resample the data or set --config.data.on_bad_rate=resample")


def _chief() -> bool:
  """Whether this is process 0 (the one that prints progress); True without JAX."""
  try:
    return jax.process_index() == 0
  except Exception:  # no JAX / no backend: a single-process tool
    return True


def _duration(seconds: float) -> str:
  s = int(round(seconds))
  return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
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
    paths, lens, rates, decs, short = [], [], [], [], 0
    files = list_files(d.path)
    progress = Progress("audio index", len(files))
    skip_bad = d.on_bad_file == "skip"
    bad_files = sources.BadRecords("audio file", "data.on_bad_file", skip_bad, report=_chief())
    for done, p in enumerate(files):
      progress(done, short + bad_files.count)
      try:
        rate, ch, frames, dec = _file_info(p)
        if frames <= 0:
          raise ValueError("has no samples")
      except (ValueError, struct.error, OSError, tf.errors.OpError) as e:
        bad_files.bad(p, f"cannot be read ({e})")
        continue
      if rate != d.sample_rate and d.on_bad_rate == "error":
        raise rate_error(f"audio file {p}", rate, cfg)
      n = int(np.ceil(frames * d.sample_rate / rate))
      if n < d.min_samples:
        short += 1
        continue
      paths.append(p)
      lens.append(n)
      rates.append(rate)
      decs.append(dec)
    progress.finish(f": {len(paths)} kept, {short} shorter than data.min_samples={d.min_samples}"
                    + (f", {bad_files.count} unreadable (skipped)" if skip_bad else ""))
    if not paths:
      raise ConfigError(f"data.path={d.path!r}: no usable file ({short} shorter than "
                        f"data.min_samples={d.min_samples}, {bad_files.count} unreadable); lower min_samples "
                        "or fix data.path")
    return dict(kind="files", paths=np.array(paths), lengths=np.array(lens, np.int64),
                rates=np.array(rates, np.int32), decoders=np.array(decs, np.int8),
                skipped_short=short, skipped_bad=bad_files.count)
  if d.source == "tfrecord":
    files = sources.record_files(d.path)
  elif d.source == "tfds":
    builder = sources.tfds_builder(cfg, d.audio_key)
    try:
      instr = builder.info.splits[d.split].file_instructions
    except (KeyError, ValueError) as e:
      raise ConfigError(f"tfds dataset {d.path!r} has no split data.split={d.split!r}: {e}") from None
    feat = builder.info.features[d.audio_key]
    rate = int(getattr(feat, "sample_rate", None) or d.sample_rate)
    if rate != d.sample_rate and d.on_bad_rate == "error":
      raise rate_error(f"tfds dataset {d.path!r} feature {d.audio_key!r}", rate, cfg)
  else:
    raise ConfigError(f"data.source={d.source!r} must be one of {sources.SOURCES}")
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


def read_record(path: str, offset: int, size: int) -> bytes:
  with tf.io.gfile.GFile(path, "rb") as f:
    f.seek(offset)
    data = f.read(size)
  if len(data) != size:
    raise ValueError(f"{_MARK} TFRecord {path}: record at byte {offset} is truncated")
  return data


def _probe_record(cfg, path: str, offset: int, size: int) -> tuple[str, bool]:
  """Type of the audio feature ("bytes" | "float" | "int64") from the first record."""
  ex = tf.train.Example.FromString(read_record(path, int(offset), int(size)))
  feats = ex.features.feature
  key = cfg.data.audio_key
  if key not in feats:
    raise ConfigError(f"TFRecord {path}: no feature data.audio_key={key!r} (features: {sorted(feats)})")
  kind = feats[key].WhichOneof("kind")
  return {"bytes_list": "bytes", "float_list": "float", "int64_list": "int64"}[kind], cfg.data.rate_key in feats


INDEX_CACHE: dict = {}


def index_key(cfg) -> str:
  d = cfg.data
  parts = [_INDEX_VERSION, d.source, d.path, d.split, d.audio_key, d.rate_key, d.sample_rate,
           d.on_bad_rate, d.min_samples]
  if d.on_bad_file != "error":  # keeps the keys of earlier runs' caches
    parts.append(d.on_bad_file)
  if d.source == "files":
    parts.append(list_files(d.path))
  elif d.source == "tfrecord":
    parts.append(sources.record_files(d.path))
  return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def index(cfg, workdir: str | None = None) -> dict:
  """The example index (built once, cached in memory and in WORKDIR/audio_index_<key>.npz)."""
  key = index_key(cfg)
  if key in INDEX_CACHE:
    return INDEX_CACHE[key]
  path = os.path.join(workdir, f"audio_index_{key}.npz") if workdir else None
  idx = load_npz(path)
  if idx is None:
    idx = _build_index(cfg)
    save_npz(path, idx)
  INDEX_CACHE[key] = idx
  return idx


def load_npz(path: str | None) -> dict | None:
  if not path or not tf.io.gfile.exists(path):
    return None
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      z = np.load(io.BytesIO(f.read()), allow_pickle=False)
      return {k: (z[k].item() if z[k].ndim == 0 else z[k]) for k in z.files}
  except Exception as e:   # truncated / not an .npz: zipfile, numpy and OS errors alike
    text = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(f"cached audio index {path} is damaged ({text}); delete it (it is "
                      "rebuilt from data.path at the next start)") from None


def save_npz(path: str | None, arrays: dict) -> None:
  if not path:
    return
  tf.io.gfile.makedirs(os.path.dirname(path))
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  tmp = f"{path}.tmp{os.getpid()}"
  with tf.io.gfile.GFile(tmp, "wb") as f:
    f.write(buf.getvalue())
  tf.io.gfile.rename(tmp, path, overwrite=True)


def num_examples(idx: dict) -> int:
  return len(idx["paths"]) if idx["kind"] == "files" else len(idx["offsets"])
