"""Sequential image sources of data2vec-vision: TFRecord files and tfds datasets. Process p
reads its own files (tfrecord: files p, p + P, ...; tfds: `split_for_jax_process`), epoch e
in a file order / shuffle buffer seeded by (seed, e); the stream is a pure function of
(seed, process_index, process_count), and resume skips the raw records (no decode) of the
current epoch. Each element: (source string, encoded image)."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import tensorflow as tf

from d2v_jax.config import ConfigError
from d2v_jax.data import sources
from d2v_jax.data.vision_decode import plain

def _record_counts(files: list[str], workdir: str) -> list[int]:
  """Records per TFRecord file (needed to resume mid-stream), cached by path/size/mtime."""
  cache = os.path.join(sources.local_dir(workdir), "data_cache", "tfrecord_counts.json")
  known = {}
  if os.path.exists(cache):
    with open(cache) as f:
      known = json.load(f)
  out, changed = [], False
  for f in files:
    st = tf.io.gfile.stat(f)
    key = f"{f}|{st.length}|{st.mtime_nsec}"
    if key not in known:
      known[key] = int(tf.data.TFRecordDataset(f).reduce(np.int64(0), lambda c, _: c + 1))
      changed = True
    out.append(known[key])
  if changed:
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".counts.", dir=os.path.dirname(cache))
    with os.fdopen(fd, "w") as fh:
      json.dump(known, fh)
    os.replace(tmp, cache)
  return out


def _epochs_from(start_example: int, epoch_size: int, epoch_ds) -> tf.data.Dataset:
  """Infinite stream epoch_ds(0), epoch_ds(1), ... positioned at element `start_example`."""
  if epoch_size < 1:
    raise ConfigError("the data source of this process is empty; check data.path / split")
  first, offset = divmod(start_example, epoch_size)
  ds = tf.data.Dataset.counter(first, dtype=tf.int64).flat_map(plain(epoch_ds))
  return ds.skip(offset)


def _epoch_seed(seed: int, epoch) -> tf.Tensor:
  s = tf.random.experimental.stateless_fold_in(tf.constant([seed, 0x5EED], tf.int64),
                                               tf.cast(epoch, tf.int64))
  return s[0]


def tfrecord_stream(cfg, workdir, start_example, process_index, process_count):
  """(source string, encoded image) per record of this process's files."""
  files = sources.record_files(cfg.data.path)
  mine = files[process_index::process_count]
  if not mine:
    raise ConfigError(f"data.path={cfg.data.path!r} has {len(files)} TFRecord files, fewer "
                      f"than the {process_count} processes; split it into more files")
  key = cfg.data.image_key
  spec = {key: tf.io.FixedLenFeature([], tf.string, default_value="")}
  files_t = tf.constant(mine)
  n, seed, buf = len(mine), int(cfg.seed), int(cfg.data.shuffle_buffer)

  def records(path):
    ds = tf.data.TFRecordDataset(path).enumerate()
    return ds.map(plain(lambda i, r: (tf.strings.join([path, "[record ", tf.strings.as_string(i), "]"]),
                                tf.io.parse_single_example(r, spec)[key])))

  def epoch_ds(e):
    es = _epoch_seed(seed, e)
    perm = tf.raw_ops.RandomIndexShuffle(index=tf.range(n, dtype=tf.int64),
                                         seed=tf.stack([es, e, tf.constant(1, tf.int64)]),
                                         max_index=tf.constant(n - 1, tf.int64))
    ds = tf.data.Dataset.from_tensor_slices(tf.gather(files_t, perm))
    ds = ds.interleave(plain(records), cycle_length=min(n, 16), block_length=1,
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.shuffle(buf, seed=es)

  size = sum(_record_counts(mine, workdir)) if start_example else 1
  return _epochs_from(start_example, size, epoch_ds)


def tfds_stream(cfg, start_example, process_index, process_count):
  import tensorflow_datasets as tfds  # (sources.tfds_builder: only tfds runs pay the import)
  builder = sources.tfds_builder(cfg, cfg.data.image_key)
  split = tfds.split_for_jax_process(cfg.data.split, process_index=process_index,
                                     process_count=process_count, drop_remainder=True)
  key = cfg.data.image_key
  decoders = ({key: tfds.decode.SkipDecoding()}
              if isinstance(builder.info.features[key], tfds.features.Image) else None)
  try:
    base = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                              read_config=tfds.ReadConfig(add_tfds_id=True))
    size = builder.info.splits[split].num_examples
  except Exception as e:  # unknown split names etc.
    raise ConfigError(f"tfds {cfg.data.path!r} split {cfg.data.split!r}: "
                      f"{str(e).splitlines()[0]}") from None
  name = f"tfds:{builder.name}/"
  base = base.map(plain(lambda ex: (tf.strings.join([name, ex["tfds_id"]]), ex[key])))
  seed, buf = int(cfg.seed), int(cfg.data.shuffle_buffer)
  return _epochs_from(start_example, size,
                      plain(lambda e: base.shuffle(buf, seed=_epoch_seed(seed, e))))
