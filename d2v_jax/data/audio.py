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

Per example (fairseq RawAudioDataset, docs/algorithm.md §2.3): mono (channels averaged), at
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

import shutil
import struct
import wave
from typing import Iterator

import ml_collections
import numpy as np
import tensorflow as tf

from d2v_jax.config import ConfigError
from d2v_jax.data import labelled, masking_v2, order, sources
from d2v_jax.data.audio_buckets import (batch_indices, bucket_plan, bucketed, crop_lengths,  # noqa: F401
                                        step_fns)
from d2v_jax.data.audio_decode import clean_error, crop_pad, load_clip, load_fn, normalize
from d2v_jax.data.audio_index import _MARK, EXTENSIONS, TF_WAV, index, list_files  # noqa: F401
from d2v_jax.data.masking_audio import block_mask_1d, conv_output_length, receptive_field, span_mask

_MASK_SALT = 0xA0D10     # mask stream, apart from the order and crop streams (same cfg.seed)
_CROP_SALT = 0xC0C0
# Data keys added after runs were written (config.fill_defaults, d2v_jax/validate.py).
LATE_DEFAULTS = {"model.feature_grad_mult": 1.0, "data.buckets": (), "data.batch_multiple": 0,
                 "data.on_bad_file": "error", "data.threads": 0, "data.tfds_data_dir": "",
                 "model.alibi": False}


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
  if cfg.objective != "v2":
    return {"mask": mask_batch(cfg, audio_len, seed, s)}
  t, v = frames(cfg, s), cfg.v2
  mask = block_mask_1d(seed, t, tf.shape(audio_len)[0], int(v.clone_batch), t,
                       mask_prob=float(v.mask_prob), adjust=float(v.mask_adjust),
                       length=int(v.mask_length))
  return {"mask": mask, "visible": masking_v2.visible_indices(mask, t - int(t * v.mask_prob))}


def tf_dataset(cfg: ml_collections.ConfigDict, workdir: str | None, *, start_step: int,
               process_index: int, process_count: int) -> tf.data.Dataset:
  """Infinite tf.data pipeline of per-process batches (+ "step") from start_step on."""
  idx = index(cfg, workdir)
  plan = bucket_plan(cfg, workdir)
  bucket_of, batch_ids = step_fns(cfg, plan, process_index, process_count)
  load = load_fn(cfg, idx)
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
  threads = max(int(d.threads), 0)
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
      if idx["decoders"][i] == TF_WAV:
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
      msg = clean_error(e)
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


def synthetic_batch(cfg: ml_collections.ConfigDict, batch_size: int, seed: int = 0) -> dict:
  """Gaussian audio at data.max_samples (every row full, as a bucketed batch) with the real
  masks, no files: the benchmark problem of the modality (d2v_jax/bench/setups.py)."""
  ex = example_batch(cfg, batch_size)
  ex["audio"] = np.random.default_rng(seed).normal(size=ex["audio"].shape).astype(np.float32)
  masks = batch_masks(cfg, tf.constant(ex["audio_len"]), tf.constant([seed, 1], tf.int64))
  return {**ex, **{k: v.numpy() for k, v in masks.items()}}


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
      *sources.checks(cfg),
      (d.on_bad_rate in ("error", "resample"), f"data.on_bad_rate={d.on_bad_rate!r} must be error or resample"),
      (d.sample_rate > 0, f"data.sample_rate={d.sample_rate} must be > 0"),
      (d.max_samples >= receptive,
       f"data.max_samples={d.max_samples} is shorter than the conv receptive field ({receptive} samples)"),
      (0 <= d.min_samples <= d.max_samples, f"data.min_samples={d.min_samples} must be in [0, data.max_samples]"),
      (0.0 <= d.mask_prob <= 1.0, f"data.mask_prob={d.mask_prob} must be in [0, 1]"),
      (1 <= d.span <= max(t, 1), f"data.span={d.span} must be in [1, frames of max_samples={t}]"),
      (d.min_spans >= 0, f"data.min_spans={d.min_spans} must be >= 0"),
      (all(int(b) > 0 for b in d.buckets), f"data.buckets={tuple(d.buckets)} "
       "must be positive sample counts"),
      (min(crop_lengths(cfg)) >= receptive,
       f"data.buckets={tuple(d.buckets)}: bucket {min(crop_lengths(cfg))} is shorter than "
       f"the conv receptive field ({receptive} samples)"),
      (int(d.batch_multiple) >= 0, f"data.batch_multiple={d.batch_multiple} must be >= 0"),
      (d.on_bad_file in ("error", "skip"),
       f"data.on_bad_file={d.on_bad_file!r} must be error or skip"),
  ]
  if cfg.objective == "v2":
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
