"""Audio decoding for data2vec-audio, as tf.data map code: a file or record -> mono float32
samples at data.sample_rate (16-bit WAV in TensorFlow, everything else through the ffmpeg
binary; a wrong rate is an error or resampled by data.on_bad_rate), normalised over the
utterance like fairseq (F.layer_norm(wav, wav.shape)), cropped at a seeded offset."""

from __future__ import annotations

import re

import numpy as np
import tensorflow as tf

from d2v_jax.config import ConfigError
from d2v_jax.data import sources
from d2v_jax.data.audio_index import FFMPEG, TF_WAV, _MARK, ffmpeg_decode, read_record

def _resample(x: tf.Tensor, rate: tf.Tensor, target: int) -> tf.Tensor:
  """Lanczos-3 anti-aliased resize (TF only); used for 16-bit WAV at the wrong rate."""
  n = tf.cast(tf.math.ceil(tf.cast(tf.size(x), tf.float64) * target / tf.cast(rate, tf.float64)), tf.int32)
  y = tf.image.resize(x[None, :, None, None], tf.stack([n, 1]), method="lanczos3", antialias=True)
  return tf.reshape(y, [-1])


def _py_decode(data: bytes, rate: int, what: bytes) -> np.ndarray:
  try:
    return ffmpeg_decode(data, int(rate))
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

  return tf.cond(tf.equal(decoder, TF_WAV), tf_wav, ffmpeg)


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


def load_fn(cfg, idx: dict):
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
    data = tf.numpy_function(lambda p, o, n: read_record(p.decode(), int(o), int(n)),
                             [path, offsets[i], sizes[i]], tf.string, stateful=False)
    name = tf.strings.join([path, " (record at byte ", tf.strings.as_string(offsets[i]), ")"])
    return tf.reshape(data, []), name

  key = cfg.data.audio_key
  if idx["kind"] == "tfds":
    features = sources.tfds_builder(cfg, key).info.features
    rate = int(idx["rate"])

    def load(i):
      data, name = read(i)
      x = features.deserialize_example(data)[key]
      if x.dtype == tf.string:  # encoded audio (tfds lazy_decode datasets)
        x, r = _decode_bytes(x, name, FFMPEG, rate, cfg)
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
      x, r = _decode_bytes(raw, name, tf.where(is_wav, TF_WAV, FFMPEG), rate, cfg)
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


def clean_error(e: tf.errors.OpError) -> str:
  """One line out of a TF error: our tagged message if there is one."""
  msg = e.message
  m = re.search(re.escape(_MARK) + r"\]?\s*(.*)", msg)
  if m:
    line = m.group(1).splitlines()[0]
    line = re.sub(r"\[([^\]]*)\]", r"\1", line)     # tf.debugging.Assert wraps each item in []
    line = re.sub(r"\s*\[Op:.*$|\s*\{\{.*$", "", line).replace(" ,", ",")
    return line.replace("  ", " ").strip()
  return re.sub(r"\{\{function_node [^}]*\}\}\s*", "", msg).splitlines()[0]


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
      x = tf.constant(ffmpeg_decode(data, rate))
    except ValueError as e:
      raise ConfigError(f"audio {path}: {e}") from None
  if int(tf.size(x)) == 0:
    raise ConfigError(f"audio {path} has no samples")
  if cfg.data.normalize:
    x = normalize(x)
  x = x.numpy()[: int(cfg.data.max_samples)].astype(np.float32)
  n = len(x)
  return np.pad(x, (0, int(cfg.data.max_samples) - n)), n
