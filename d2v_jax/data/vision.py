"""Image input for data2vec-vision: sources, BEiT augmentation, block masks, ordered batches.

  python -m d2v_jax.data.vision --config configs/vision.py:variant=tiny,runlocal --steps 3

Sources (cfg.data.source):
  "files"     a directory tree or comma-separated globs of images: every format TF's decoder
              reads (EXTENSIONS: jpg/jpeg, png, gif, bmp, webp), or the subset in
              cfg.data.extensions when it is not empty; the probe reads the same list,
              read by random access: batch `s` of process `p` holds the dataset indices of
              d2v_jax/data/order.py (seeded per-epoch permutation of global example numbers
              g = s * B + p * b + j), so resuming at any step costs O(1).
  "tfrecord"  globs of TFRecord files of tf.train.Example with the encoded image under
              cfg.data.image_key; "tfds": a prepared tfds dataset (name with
              cfg.data.tfds_data_dir, or its directory), split cfg.data.split, never
              downloaded. Both are read sequentially: process p reads its own files (tfrecord:
              files p, p + P, ...; tfds: `split_for_jax_process`), epoch e in a file order /
              shuffle buffer seeded by (seed, e). The stream is a pure function of
              (seed, process_index, process_count); resume skips the raw records (no decode)
              of the current epoch.

Images with an alpha channel (PNG, WebP, BMP; gray + alpha too) are composited onto
data.background (default white, (255, 255, 255)) in training and in the probe alike
(decode_rgb); GIF frames are read as RGB (TF's decoder drops GIF transparency).

Per example (seeded by its global example number g, so the same on resume): decode, random
resized crop (area data.crop_scale, aspect data.crop_ratio; JPEG decodes only the crop
window), bicubic resize to model.image_size, horizontal flip, colour jitter (brightness,
contrast, saturation in a random order, as torchvision ColorJitter), normalisation by
data.mean / data.std. Per batch: BEiT block masks (d2v_jax/data/masking_vision.py) seeded by
(seed, step, process_index). Batches: {"image": float32 [b, S, S, 3], "mask": bool [b, patches]}.

Bad images (unreadable, empty, not an image, truncated: a JPEG without its end marker, a PNG
that fails to decode): with data.on_bad_image="skip" the example stays in its batch (so the
order is untouched) with an all-False mask, so it adds nothing to the loss; the count and
path are reported on stderr once per file (later epochs only count it) and in
`iterator.bad_images` (every skip) / `iterator.bad_paths` (distinct files). With "stop" the first one stops the
run with BadImageError naming the file. A batch in which no image loads always stops the run
(that is a wrong data.path / data.image_key, not a few bad files).

Departures from data2vec_vision (datasets.py), on purpose: the crop is drawn by
tf.image.sample_distorted_bounding_box (uniform aspect ratio, whole image after 10 failed
tries) instead of torchvision's RandomResizedCrop (log-uniform aspect, centre crop fallback);
colour jitter runs after the crop, on float images (DV: before, on uint8 PIL images).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time

import ml_collections
import numpy as np
import tensorflow as tf

from d2v_jax.config import ConfigError
from d2v_jax.data import labelled, masking_v2, order
from d2v_jax.data.masking_vision import BEIT_MASK_RATIO, BlockMaskSpec, block_masks

SOURCES = ("files", "tfrecord", "tfds")
# What tf.io.decode_image reads (BMP, GIF, JPEG, PNG, WebP): the one list of image formats of
# the trainer (data.source=files), the probe and the tools.
EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
BACKGROUND = (255, 255, 255)   # default of data.background: alpha is composited onto white
_MASK_SALT = 0xB10C      # mask stream (per batch), apart from the order stream
_AUG_SALT = 0xA06        # augmentation stream (per example)
_JPEG_TAIL = 256         # a JPEG's end marker (FF D9) must lie in its last bytes
_plain = tf.autograph.experimental.do_not_convert  # map functions are plain graph code


class BadImageError(ConfigError):
  """A corrupt / truncated / unreadable image with data.on_bad_image="stop"."""


# --------------------------------------------------------------------------------- config


def mask_spec(cfg) -> BlockMaskSpec:
  return BlockMaskSpec.from_config(cfg)


def num_patches(cfg) -> int:
  return (cfg.model.image_size // cfg.model.patch_size) ** 2


def image_extensions(cfg) -> tuple[str, ...]:
  """data.extensions when set (each must be in EXTENSIONS), else EXTENSIONS."""
  exts = tuple(e.lower() if e.startswith(".") else "." + e.lower()
               for e in (cfg.data.get("extensions", ()) or ()))
  unknown = sorted(set(exts) - set(EXTENSIONS))
  if unknown:
    raise ConfigError(f"data.extensions holds {unknown}, which TF's image decoder cannot read; "
                      f"readable: {list(EXTENSIONS)}")
  return exts or EXTENSIONS


def background(cfg) -> tuple[float, float, float]:
  """data.background (RGB 0..255 onto which transparent pixels are composited)."""
  bg = tuple(float(v) for v in cfg.data.get("background", BACKGROUND))
  if len(bg) != 3 or not all(0.0 <= v <= 255.0 for v in bg):
    raise ConfigError(f"data.background={bg} must be 3 values in [0, 255] (RGB)")
  return bg


def decode_rgb(data: tf.Tensor, bg=BACKGROUND) -> tf.Tensor:
  """Encoded image (any EXTENSIONS format) -> float32 [H, W, 3] in [0, 255]. Gray is
  replicated; an alpha channel is composited onto `bg`: rgb * a + bg * (1 - a)."""
  img = tf.cast(tf.io.decode_image(data, channels=0, expand_animations=False), tf.float32)
  opaque = lambda x: tf.fill(tf.shape(x[..., :1]), 255.0)  # noqa: E731
  rgba = tf.switch_case(tf.shape(img)[-1] - 1, [
      lambda: tf.concat([tf.tile(img[..., :1], [1, 1, 3]), opaque(img)], -1),      # gray
      lambda: tf.concat([tf.tile(img[..., :1], [1, 1, 3]), img[..., 1:2]], -1),    # gray + alpha
      lambda: tf.concat([img[..., :3], opaque(img)], -1),                          # RGB
      lambda: img[..., :4],                                                        # RGBA
  ])
  a = rgba[..., 3:] / 255.0
  out = rgba[..., :3] * a + tf.constant(bg, tf.float32) * (1.0 - a)
  return tf.ensure_shape(out, [None, None, 3])


def prepare(cfg: ml_collections.ConfigDict, workdir: str) -> None:
  """Resolves data.num_mask_patches (None -> BEiT's 120/196 of this grid) in place."""
  del workdir
  if cfg.model.image_size % cfg.model.patch_size == 0 and cfg.data.num_mask_patches is None:
    cfg.data.num_mask_patches = int(round(BEIT_MASK_RATIO * num_patches(cfg)))


# Model keys without reading the data (AOT compile, python -m d2v_jax.init): prepare reads no
# image, it only resolves the mask-count default.
resolve_offline = prepare


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Range checks of the vision model / data keys (ConfigError names the key)."""
  m, d = cfg.model, cfg.data
  checks = [
      (m.patch_size >= 1 and m.image_size >= m.patch_size,
       f"model.image_size={m.image_size} must be >= model.patch_size={m.patch_size} >= 1"),
      (m.image_size % m.patch_size == 0,
       f"model.image_size={m.image_size} is not divisible by model.patch_size={m.patch_size}"),
      (m.channels == 3, f"model.channels={m.channels}: the image pipeline decodes RGB (3)"),
      (d.source in SOURCES, f"data.source={d.source!r} must be one of {SOURCES}"),
      (bool(d.path), "data.path is empty; set --config.data.path to an image directory / glob, "
                     "TFRecord glob or tfds name"),
      (d.on_bad_image in ("skip", "stop"), f"data.on_bad_image={d.on_bad_image!r}: use skip or stop"),
      (len(tuple(d.get("background", BACKGROUND))) == 3
       and all(0 <= v <= 255 for v in d.get("background", BACKGROUND)),
       f"data.background={tuple(d.get('background', BACKGROUND))} must be 3 values in [0, 255] (RGB)"),
      (0 < d.crop_scale[0] <= d.crop_scale[1] <= 1,
       f"data.crop_scale={tuple(d.crop_scale)} must satisfy 0 < min <= max <= 1"),
      (0 < d.crop_ratio[0] <= d.crop_ratio[1],
       f"data.crop_ratio={tuple(d.crop_ratio)} must satisfy 0 < min <= max"),
      (len(d.color_jitter) == 3 and all(0 <= j < 1 for j in d.color_jitter),
       f"data.color_jitter={tuple(d.color_jitter)}: three strengths in [0, 1)"),
      (len(d.mean) == 3 and len(d.std) == 3 and all(s > 0 for s in d.std),
       "data.mean / data.std need 3 values each (std > 0)"),
      (d.shuffle_buffer >= 1, f"data.shuffle_buffer={d.shuffle_buffer} must be >= 1"),
  ]
  for ok, msg in checks:
    if not ok:
      raise ConfigError(msg)
  mask_spec(cfg).validate()
  image_extensions(cfg)


def example_batch(cfg: ml_collections.ConfigDict, batch_size: int) -> dict:
  """Batch with the real shapes/dtypes (model init, AOT compile); no files are read."""
  s = cfg.model.image_size
  image = np.zeros((batch_size, s, s, cfg.model.channels), np.float32)
  if cfg.get("objective", "v1") == "v2":
    v2 = masking_v2.block_2d_batch(cfg, tf.constant([0, 0], tf.int64), batch_size,
                                   s // cfg.model.patch_size)
    return {"image": image, **{k: v.numpy() for k, v in v2.items()}}
  one = block_masks(tf.constant([0, 0], tf.int64), 1, mask_spec(cfg)).numpy()
  return {"image": image, "mask": np.repeat(one, batch_size, axis=0)}


# ------------------------------------------------------------------------------ sources


def list_images(path: str, extensions=EXTENSIONS) -> list[str]:
  """Sorted image files under comma-separated directories / globs (directories recursively)."""
  exts = tuple(e.lower() for e in (extensions or EXTENSIONS))   # () = every readable format
  out = set()
  for pat in (p.strip() for p in path.split(",")):
    if not pat:
      continue
    for hit in (tf.io.gfile.glob(pat) if any(c in pat for c in "*?[") else [pat]):
      if tf.io.gfile.isdir(hit):
        for root, _, names in tf.io.gfile.walk(hit):
          out.update(os.path.join(root, n) for n in names if n.lower().endswith(exts))
      elif tf.io.gfile.exists(hit) and hit.lower().endswith(exts):
        out.add(hit)
  if not out:
    raise ConfigError(f"data.path={path!r} holds no image file with extension in "
                      f"{sorted(set(exts))}; check the path / data.extensions")
  return sorted(out)


def _glob(pattern: str) -> list[str]:
  files = sorted({f for p in pattern.split(",") if p.strip() for f in tf.io.gfile.glob(p.strip())})
  if not files:
    raise ConfigError(f"data.path={pattern!r} matches no TFRecord file; check the glob")
  return files


def _tfds_builder(cfg):
  import tensorflow_datasets as tfds
  path = cfg.data.path
  try:
    if tf.io.gfile.isdir(path):
      builder = tfds.builder_from_directory(path)
    else:
      builder = tfds.builder(path, data_dir=cfg.data.tfds_data_dir or None)
  except Exception as e:  # tfds raises many types for unknown names / bad dirs
    raise ConfigError(f"data.path={path!r} is not a tfds dataset: {str(e).splitlines()[0]}") from None
  if not tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json")):
    raise ConfigError(
        f"tfds dataset {path!r} is not prepared in {builder.data_dir} (never downloaded here; "
        "imagenet2012 needs the manual download): prepare it, set data.tfds_data_dir, or use "
        "data.source=files / tfrecord")
  if cfg.data.image_key not in builder.info.features:
    raise ConfigError(f"tfds dataset {path!r} has no feature data.image_key="
                      f"{cfg.data.image_key!r}; features: {sorted(builder.info.features.keys())}")
  return builder


def _local_dir(workdir: str) -> str:
  if "://" not in workdir:
    return workdir
  return os.path.join(tempfile.gettempdir(), "d2v_jax",
                      hashlib.sha256(workdir.encode()).hexdigest()[:16])


def _record_counts(files: list[str], workdir: str) -> list[int]:
  """Records per TFRecord file (needed to resume mid-stream), cached by path/size/mtime."""
  cache = os.path.join(_local_dir(workdir), "data_cache", "tfrecord_counts.json")
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
  ds = tf.data.Dataset.counter(first, dtype=tf.int64).flat_map(_plain(epoch_ds))
  return ds.skip(offset)


def _epoch_seed(seed: int, epoch) -> tf.Tensor:
  s = tf.random.experimental.stateless_fold_in(tf.constant([seed, 0x5EED], tf.int64),
                                               tf.cast(epoch, tf.int64))
  return s[0]


def _tfrecord_stream(cfg, workdir, start_example, process_index, process_count):
  """(source string, encoded image) per record of this process's files."""
  files = _glob(cfg.data.path)
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
    return ds.map(_plain(lambda i, r: (tf.strings.join([path, "[record ", tf.strings.as_string(i), "]"]),
                                tf.io.parse_single_example(r, spec)[key])))

  def epoch_ds(e):
    es = _epoch_seed(seed, e)
    perm = tf.raw_ops.RandomIndexShuffle(index=tf.range(n, dtype=tf.int64),
                                         seed=tf.stack([es, e, tf.constant(1, tf.int64)]),
                                         max_index=tf.constant(n - 1, tf.int64))
    ds = tf.data.Dataset.from_tensor_slices(tf.gather(files_t, perm))
    ds = ds.interleave(_plain(records), cycle_length=min(n, 16), block_length=1,
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.shuffle(buf, seed=es)

  size = sum(_record_counts(mine, workdir)) if start_example else 1
  return _epochs_from(start_example, size, epoch_ds)


def _tfds_stream(cfg, start_example, process_index, process_count):
  import tensorflow_datasets as tfds
  builder = _tfds_builder(cfg)
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
  base = base.map(_plain(lambda ex: (tf.strings.join([name, ex["tfds_id"]]), ex[key])))
  seed, buf = int(cfg.seed), int(cfg.data.shuffle_buffer)
  return _epochs_from(start_example, size,
                      _plain(lambda e: base.shuffle(buf, seed=_epoch_seed(seed, e))))


# ------------------------------------------------------------------------- augmentation


def _jpeg_complete(data: tf.Tensor) -> tf.Tensor:
  """True when the end-of-image marker FF D9 is among the last bytes (not truncated)."""
  n = tf.strings.length(data)
  tail = tf.io.decode_raw(tf.strings.substr(data, tf.maximum(n - _JPEG_TAIL, 0), _JPEG_TAIL),
                          tf.uint8)
  return tf.reduce_any((tail[:-1] == 0xFF) & (tail[1:] == 0xD9))


def _color_jitter(img: tf.Tensor, strengths, seed: tf.Tensor) -> tf.Tensor:
  """torchvision ColorJitter(brightness, contrast, saturation) on float [H, W, 3] in [0, 1]."""
  seeds = tf.random.experimental.stateless_split(seed, 2)
  u = tf.random.stateless_uniform([3], seeds[0], -1.0, 1.0)
  factors = 1.0 + u * tf.constant(strengths, tf.float32)
  gray = lambda x: tf.image.rgb_to_grayscale(x)  # noqa: E731  ITU-R 601 weights, as torchvision
  ops = [
      lambda x: x * factors[0],
      lambda x: (x - tf.reduce_mean(gray(x))) * factors[1] + tf.reduce_mean(gray(x)),
      lambda x: (x - gray(x)) * factors[2] + gray(x),
  ]
  order_ = tf.argsort(tf.random.stateless_uniform([3], seeds[1]))
  for i in range(3):
    img = tf.clip_by_value(tf.switch_case(order_[i], [lambda f=f: f(img) for f in ops]), 0.0, 1.0)
  return img


def _augment(data: tf.Tensor, seed: tf.Tensor, cfg) -> tf.Tensor:
  """Encoded image -> normalised float32 [S, S, 3]; raises (InvalidArgument) on bad data."""
  d, size = cfg.data, cfg.model.image_size
  seeds = tf.random.experimental.stateless_split(seed, 3)
  whole = tf.constant([[[0.0, 0.0, 1.0, 1.0]]])

  def window(shape):
    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, whole, seeds[0], min_object_covered=0.0, aspect_ratio_range=tuple(d.crop_ratio),
        area_range=tuple(d.crop_scale), max_attempts=10, use_image_if_no_bounding_boxes=True)
    return begin[0], begin[1], extent[0], extent[1]

  def jpeg():
    tf.debugging.assert_equal(_jpeg_complete(data), True, message="truncated JPEG")
    y, x, h, w = window(tf.image.extract_jpeg_shape(data))
    return tf.image.decode_and_crop_jpeg(data, tf.stack([y, x, h, w]), channels=3)

  def other():
    img = decode_rgb(data, bg)
    y, x, h, w = window(tf.shape(img))
    return img[y:y + h, x:x + w]

  bg = background(cfg)
  img = tf.cond(tf.io.is_jpeg(data), lambda: tf.cast(jpeg(), tf.float32), other)
  img = tf.image.resize(img, [size, size], method="bicubic", antialias=True)
  img = tf.clip_by_value(img / 255.0, 0.0, 1.0)
  if d.flip:
    img = tf.image.stateless_random_flip_left_right(img, seeds[1])
  if any(j > 0 for j in d.color_jitter):
    img = _color_jitter(img, tuple(d.color_jitter), seeds[2])
  img = (img - tf.constant(d.mean, tf.float32)) / tf.constant(d.std, tf.float32)
  return tf.ensure_shape(img, [size, size, 3])


def _try(fn, *args, fallback):
  """fn(*args) -> (value, True), or (fallback, False) when it raises (bad file, bad bytes).

  tf.data cannot catch an op error inside a map function; a one-element dataset with
  ignore_errors() can, at ~0.1 ms per example.
  """
  good = tf.data.Dataset.from_tensors(args).map(_plain(lambda *a: (fn(*a), True))).ignore_errors()
  bad = tf.data.Dataset.from_tensors((fallback, False))
  return good.concatenate(bad).take(1).get_single_element()


def example_seed(seed: int, g) -> tf.Tensor:
  s = tf.constant([seed, _AUG_SALT], tf.int64)
  return tf.random.experimental.stateless_fold_in(s, tf.cast(g, tf.int64))


def load_example(src: tf.Tensor, g: tf.Tensor, cfg, *, read_file: bool,
                 data: tf.Tensor | None = None) -> dict:
  """One example: {"image", "ok", "src"}; `src` is a path (read_file) or names `data`."""
  size = cfg.model.image_size
  seed = example_seed(int(cfg.seed), g)

  def fn(s, raw):
    return _augment(tf.io.read_file(s) if read_file else raw, seed, cfg)

  raw = tf.constant("") if data is None else data
  image, ok = _try(fn, src, raw, fallback=tf.zeros([size, size, 3], tf.float32))
  return {"image": image, "ok": ok, "src": src}


# ---------------------------------------------------------------------------- pipeline


def tf_dataset(cfg: ml_collections.ConfigDict, workdir: str, *, start_step: int,
               process_index: int, process_count: int) -> tf.data.Dataset:
  """Batches {"image", "mask", "ok" bool [b], "src" string [b]} (see module doc)."""
  spec = mask_spec(cfg)
  B = cfg.batch_size
  b = order.per_process_batch(B, process_count)
  p = process_index
  par = tf.data.AUTOTUNE

  if cfg.data.source == "files":
    files = list_images(cfg.data.path, image_extensions(cfg))
    paths = tf.constant(files)
    ds = order.index_batches(len(files), B, seed=cfg.seed, start_step=start_step,
                             process_index=p, process_count=process_count)
    ds = ds.map(_plain(lambda s, idx: (tf.gather(paths, idx), s * B + p * b + tf.range(b, dtype=tf.int64))))
    ds = ds.unbatch().map(_plain(lambda src, g: load_example(src, g, cfg, read_file=True)),
                          num_parallel_calls=par, deterministic=True)
  elif cfg.data.source in ("tfrecord", "tfds"):
    start = start_step * b
    if cfg.data.source == "tfrecord":
      ds = _tfrecord_stream(cfg, workdir, start, p, process_count)
    else:
      ds = _tfds_stream(cfg, start, p, process_count)
    ds = ds.enumerate(start=start)  # n = s * b + j in this process's stream

    def load(n, item):
      src, data = item
      g = (n // b) * B + p * b + n % b
      return load_example(src, g, cfg, read_file=False, data=data)

    ds = ds.map(_plain(load), num_parallel_calls=par, deterministic=True)
  else:
    raise ConfigError(f"data.source={cfg.data.source!r} must be one of {SOURCES}")

  def add_mask(batch, step):
    seed = order.batch_seed(cfg.seed, step, p, _MASK_SALT)
    if cfg.get("objective", "v1") == "v2":  # exact counts: the visible gather is static
      batch.update(masking_v2.block_2d_batch(cfg, seed, b, cfg.model.image_size // cfg.model.patch_size))
      return batch
    batch["mask"] = block_masks(seed, b, spec) & batch["ok"][:, None]
    return batch

  ds = ds.batch(b, drop_remainder=True)
  steps = tf.data.Dataset.counter(start_step, dtype=tf.int64)
  ds = tf.data.Dataset.zip(ds, steps).map(_plain(add_mask), num_parallel_calls=par, deterministic=True)
  opts = tf.data.Options()
  opts.deterministic = True
  if cfg.data.threads:
    opts.threading.private_threadpool_size = int(cfg.data.threads)
  return ds.with_options(opts).prefetch(par)


def describe_bad(src: str) -> str:
  """Why a file failed (the decoder's first message line); '' for records."""
  if "[record " in src or src.startswith("tfds:"):
    return "corrupt, truncated or not an image"
  try:
    data = tf.io.read_file(src)
    if tf.io.is_jpeg(data) and not bool(_jpeg_complete(data)):
      return "truncated JPEG (no end-of-image marker)"
    decode_rgb(data)
  except (tf.errors.OpError, OSError) as e:
    msg = getattr(e, "message", str(e)).strip().splitlines()[0]
    return msg.split("}}")[-1].split("[Op:")[0].strip() or type(e).__name__
  return "corrupt, truncated or not an image"


class ImageBatches:
  """Iterator of {"image", "mask"} numpy batches; counts / reports / stops on bad images.
  A skipped file is warned about once (with why); every later skip of it is only counted."""

  def __init__(self, ds: tf.data.Dataset, on_bad: str):
    self._it = ds.as_numpy_iterator()
    self._on_bad = on_bad
    self.bad_images = 0              # skips, every epoch counted
    self.bad_paths: list[str] = []   # distinct files, the first 1000
    self._warned: set[str] = set()

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self._it)
    ok = batch.pop("ok")
    srcs = batch.pop("src")
    if not ok.any():
      # Not a few corrupt files but a wrong source (e.g. data.image_key) or a broken decoder.
      src = srcs[0].decode("utf-8", errors="replace")
      raise BadImageError(f"no image of a whole batch could be loaded, e.g. {src}: "
                          f"{describe_bad(src)}; check data.path / data.image_key")
    if not ok.all():
      for src in srcs[~ok]:
        src = src.decode("utf-8", errors="replace")
        if self._on_bad == "stop":
          raise BadImageError(f"bad image {src}: {describe_bad(src)} (data.on_bad_image='stop'; "
                              "fix or remove the file, or set --config.data.on_bad_image=skip)")
        self.bad_images += 1
        if src in self._warned:
          continue
        self._warned.add(src)
        why = describe_bad(src)
        if len(self.bad_paths) < 1000:
          self.bad_paths.append(src)
        print(f"warning: skipped bad image {src}: {why} ({len(self._warned)} bad files, "
              f"{self.bad_images} skips so far; later skips of it are only counted)",
              file=sys.stderr, flush=True)
    return batch


def build_dataset(cfg: ml_collections.ConfigDict, workdir: str, *, start_step: int,
                  process_index: int, process_count: int) -> ImageBatches:
  """Infinite iterator of per-process batches {"image": float32 [b, S, S, 3], "mask": bool}."""
  prepare(cfg, workdir)
  validate(cfg)
  ds = tf_dataset(cfg, workdir, start_step=start_step, process_index=process_index,
                  process_count=process_count)
  return ImageBatches(ds, cfg.data.on_bad_image)


# ------------------------------------------------------------------------------------ CLI


# ------------------------------------------------------------------ labelled probe sets


def load_image(path: str, cfg) -> np.ndarray:
  """Eval preprocessing: decoded as in training (vision.decode_rgb: alpha composited onto
  data.background), shorter side -> image_size (bicubic, antialiased), centre crop, [0, 1],
  normalised by data.mean / data.std. float32 [S, S, 3]."""
  s = int(cfg.model.image_size)
  try:
    img = decode_rgb(tf.io.read_file(path), background(cfg))
  except tf.errors.OpError as e:
    raise ConfigError(f"image {path} cannot be decoded: {e.message.splitlines()[0]}") from None
  h, w = int(img.shape[0]), int(img.shape[1])
  scale = s / min(h, w)
  nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
  img = tf.image.resize(img, [nh, nw], method="bicubic", antialias=True)
  top, left = (nh - s) // 2, (nw - s) // 2
  img = tf.clip_by_value(img[top:top + s, left:left + s] / 255.0, 0.0, 1.0)
  img = (img - tf.constant(cfg.data.mean, tf.float32)) / tf.constant(cfg.data.std, tf.float32)
  return img.numpy().astype(np.float32)


def labelled_set(cfg, workdir: str | None, path: str) -> labelled.LabelledSet:
  """A folder per class of images (the trainer's extensions, image_extensions), each
  preprocessed by load_image (python -m d2v_jax.probe)."""
  del workdir
  files, names = labelled.class_folders(path, image_extensions(cfg))
  images = np.stack([load_image(f, cfg) for f in files])
  labels, classes = labelled.label_ids(names)
  arrays = {"image": images, "mask": np.zeros((len(files), num_patches(cfg)), bool)}
  return labelled.LabelledSet(arrays, labels, classes, files)


def _main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="python -m d2v_jax.data.vision",
                              description="print a few batches of a vision config")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--workdir", default=tempfile.gettempdir())
  args, rest = p.parse_known_args(argv)
  from absl import flags
  from d2v_jax import config as config_lib
  try:
    cfg = config_lib.parse_argv([p.prog] + rest, flags.FlagValues()).config
    it = build_dataset(cfg, args.workdir, start_step=0, process_index=0, process_count=1)
    t0 = time.time()
    for s in range(args.steps):
      batch = next(it)
      img, mask = batch["image"], batch["mask"]
      print(f"step {s}: image {img.shape} mean {img.mean():+.3f} std {img.std():.3f} | mask "
            f"{mask.shape} {mask.sum(1).min()}-{mask.sum(1).max()} per image "
            f"({time.time() - t0:.2f} s)")
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(_main(sys.argv[1:]))
