"""Image input for data2vec-vision: sources, BEiT augmentation, block masks, ordered batches.

  python -m d2v_jax.data batches --config configs/vision.py:variant=tiny,runlocal --steps 3

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

Sources: d2v_jax/data/sources.py (files, globs), vision_records.py (TFRecord / tfds streams);
decoding and augmentation: vision_decode.py.

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

import ml_collections
import numpy as np
import tensorflow as tf

from d2v_jax.config import ConfigError
from d2v_jax.data import labelled, masking_v2, order, sources
from d2v_jax.data.masking_vision import BEIT_MASK_RATIO, BlockMaskSpec, block_masks
from d2v_jax.data.vision_decode import BACKGROUND, describe_bad, load_example, load_image, plain
from d2v_jax.data.vision_records import tfds_stream, tfrecord_stream

# What tf.io.decode_image reads (BMP, GIF, JPEG, PNG, WebP): the one list of image formats of
# the trainer (data.source=files), the probe and the tools.
EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
_MASK_SALT = 0xB10C      # mask stream (per batch), apart from the order stream
# Data keys added after runs were written (config.fill_defaults, d2v_jax/validate.py).
LATE_DEFAULTS = {"data.extensions": (), "data.background": BACKGROUND, "data.mask_attempts": 0,
                 "data.threads": 0, "model.init": "beit", "model.embed_dropout": 0.0,
                 "model.rel_pos_bias": True, "model.pos_embed": "none"}


class BadImageError(ConfigError):
  """A corrupt / truncated / unreadable image with data.on_bad_image="stop"."""


def mask_spec(cfg) -> BlockMaskSpec:
  return BlockMaskSpec.from_config(cfg)


def num_patches(cfg) -> int:
  return (cfg.model.image_size // cfg.model.patch_size) ** 2


def image_extensions(cfg) -> tuple[str, ...]:
  """data.extensions when set (each must be in EXTENSIONS), else EXTENSIONS."""
  exts = tuple(e.lower() if e.startswith(".") else "." + e.lower()
               for e in (cfg.data.extensions or ()))
  unknown = sorted(set(exts) - set(EXTENSIONS))
  if unknown:
    raise ConfigError(f"data.extensions holds {unknown}, which TF's image decoder cannot read; "
                      f"readable: {list(EXTENSIONS)}")
  return exts or EXTENSIONS


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
      (m.pos_embed in ("none", "sincos"), f"model.pos_embed={m.pos_embed!r}: use none or sincos"),
      (m.pos_embed != "sincos" or m.encoder.hidden % 4 == 0,
       f"model.pos_embed=sincos needs model.encoder.hidden divisible by 4 (got {m.encoder.hidden})"),
      *sources.checks(cfg),
      (d.on_bad_image in ("skip", "stop"), f"data.on_bad_image={d.on_bad_image!r}: use skip or stop"),
      (len(tuple(d.background)) == 3 and all(0 <= v <= 255 for v in d.background),
       f"data.background={tuple(d.background)} must be 3 values in [0, 255] (RGB)"),
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
  if cfg.objective == "v2":
    v2 = masking_v2.block_2d_batch(cfg, tf.constant([0, 0], tf.int64), batch_size,
                                   s // cfg.model.patch_size)
    return {"image": image, **{k: v.numpy() for k, v in v2.items()}}
  one = block_masks(tf.constant([0, 0], tf.int64), 1, mask_spec(cfg)).numpy()
  return {"image": image, "mask": np.repeat(one, batch_size, axis=0)}


def synthetic_batch(cfg: ml_collections.ConfigDict, batch_size: int, seed: int = 0) -> dict:
  """Gaussian pixels with the real block masks, no files: the benchmark problem of the
  modality (d2v_jax/bench/setups.py)."""
  ex = example_batch(cfg, batch_size)
  ex["image"] = np.random.default_rng(seed).normal(size=ex["image"].shape).astype(np.float32)
  return ex


def list_images(path: str, extensions=EXTENSIONS) -> list[str]:
  """Sorted image files under comma-separated directories / globs (directories recursively;
  both keep only `extensions`, () = every readable format)."""
  exts = tuple(e.lower() for e in (extensions or EXTENSIONS))
  return sources.expand(path, f"image file with extension in {sorted(set(exts))} (check "
                        "data.extensions)", lambda n: n.lower().endswith(exts), filter_globs=True)


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
    ds = ds.map(plain(lambda s, idx: (tf.gather(paths, idx), s * B + p * b + tf.range(b, dtype=tf.int64))))
    ds = ds.unbatch().map(plain(lambda src, g: load_example(src, g, cfg, read_file=True)),
                          num_parallel_calls=par, deterministic=True)
  elif cfg.data.source in ("tfrecord", "tfds"):
    start = start_step * b
    if cfg.data.source == "tfrecord":
      ds = tfrecord_stream(cfg, workdir, start, p, process_count)
    else:
      ds = tfds_stream(cfg, start, p, process_count)
    ds = ds.enumerate(start=start)  # n = s * b + j in this process's stream

    def load(n, item):
      src, data = item
      g = (n // b) * B + p * b + n % b
      return load_example(src, g, cfg, read_file=False, data=data)

    ds = ds.map(plain(load), num_parallel_calls=par, deterministic=True)
  else:
    raise ConfigError(f"data.source={cfg.data.source!r} must be one of {sources.SOURCES}")

  def add_mask(batch, step):
    seed = order.batch_seed(cfg.seed, step, p, _MASK_SALT)
    if cfg.objective == "v2":  # exact counts: the visible gather is static
      batch.update(masking_v2.block_2d_batch(cfg, seed, b, cfg.model.image_size // cfg.model.patch_size))
      return batch
    batch["mask"] = block_masks(seed, b, spec) & batch["ok"][:, None]
    return batch

  ds = ds.batch(b, drop_remainder=True)
  steps = tf.data.Dataset.counter(start_step, dtype=tf.int64)
  ds = tf.data.Dataset.zip(ds, steps).map(plain(add_mask), num_parallel_calls=par, deterministic=True)
  return ds.with_options(sources.options(cfg)).prefetch(par)


class ImageBatches:
  """Iterator of {"image", "mask"} numpy batches; bad images follow data.on_bad_image through
  sources.BadRecords (`bad`: its count of skips and distinct files)."""

  def __init__(self, ds: tf.data.Dataset, on_bad: str):
    self._it = ds.as_numpy_iterator()
    self.bad = sources.BadRecords("image", "data.on_bad_image", on_bad == "skip", BadImageError)

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
    for src in srcs[~ok]:
      src = src.decode("utf-8", errors="replace")
      self.bad.bad(src, describe_bad(src))
    return batch


def build_dataset(cfg: ml_collections.ConfigDict, workdir: str, *, start_step: int,
                  process_index: int, process_count: int) -> ImageBatches:
  """Infinite iterator of per-process batches {"image": float32 [b, S, S, 3], "mask": bool}."""
  prepare(cfg, workdir)
  validate(cfg)
  ds = tf_dataset(cfg, workdir, start_step=start_step, process_index=process_index,
                  process_count=process_count)
  return ImageBatches(ds, cfg.data.on_bad_image)


def labelled_set(cfg, workdir: str | None, path: str) -> labelled.LabelledSet:
  """A folder per class of images (the trainer's extensions, image_extensions), each
  preprocessed by load_image (python -m d2v_jax.probe)."""
  del workdir
  files, names = labelled.class_folders(path, image_extensions(cfg))
  images = np.stack([load_image(f, cfg) for f in files])
  labels, classes = labelled.label_ids(names)
  arrays = {"image": images, "mask": np.zeros((len(files), num_patches(cfg)), bool)}
  return labelled.LabelledSet(arrays, labels, classes, files)
