"""Image decoding and augmentation for data2vec-vision, in TF graph code (tf.data maps).

decode_rgb: any EXTENSIONS format -> float RGB, alpha composited onto data.background (the
trainer and the probe alike). Training (load_example): per example, seeded by its global
example number, a random resized crop (JPEG decodes only the crop window), bicubic resize,
flip, colour jitter, normalisation; a bad file yields ok=False instead of an error. Eval
(load_image): shorter side resize and centre crop.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from d2v_jax.config import ConfigError

BACKGROUND = (255, 255, 255)   # default of data.background: alpha is composited onto white
_AUG_SALT = 0xA06        # augmentation stream (per example)
_JPEG_TAIL = 256         # a JPEG's end marker (FF D9) must lie in its last bytes
plain = tf.autograph.experimental.do_not_convert  # map functions are plain graph code


def background(cfg) -> tuple[float, float, float]:
  """data.background (RGB 0..255 onto which transparent pixels are composited)."""
  bg = tuple(float(v) for v in cfg.data.background)
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


def jpeg_complete(data: tf.Tensor) -> tf.Tensor:
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
    tf.debugging.assert_equal(jpeg_complete(data), True, message="truncated JPEG")
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
  good = tf.data.Dataset.from_tensors(args).map(plain(lambda *a: (fn(*a), True))).ignore_errors()
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


def describe_bad(src: str) -> str:
  """Why a file failed (the decoder's first message line); '' for records."""
  if "[record " in src or src.startswith("tfds:"):
    return "corrupt, truncated or not an image"
  try:
    data = tf.io.read_file(src)
    if tf.io.is_jpeg(data) and not bool(jpeg_complete(data)):
      return "truncated JPEG (no end-of-image marker)"
    decode_rgb(data)
  except (tf.errors.OpError, OSError) as e:
    msg = getattr(e, "message", str(e)).strip().splitlines()[0]
    return msg.split("}}")[-1].split("[Op:")[0].strip() or type(e).__name__
  return "corrupt, truncated or not an image"


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
