"""Vision input (d2v_jax/data/vision.py): sources (files / TFRecord / tfds), augmentation,
masks, order / resume / process split, bad images, config validation."""

import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from d2v_jax import config as config_lib, validate
from d2v_jax.config import ConfigError, set_path
from d2v_jax.data import vision as V
from conftest import ROOT

PHOTOS = os.path.join(ROOT, "data", "vision", "photos")
NAMES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins")
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def photo(name: str, size=(96, 128)) -> np.ndarray:
  import skimage.data
  a = getattr(skimage.data, name)()
  img = Image.fromarray(a).convert("RGB").resize(size[::-1], Image.BICUBIC)
  return np.asarray(img)


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
  """Six real photos (scikit-image), half PNG half JPEG, in a two-level tree."""
  d = tmp_path_factory.mktemp("photos")
  for i, name in enumerate(NAMES):
    sub = d / ("a" if i % 2 else "b")
    sub.mkdir(exist_ok=True)
    ext = "png" if i % 2 else "jpg"
    Image.fromarray(photo(name)).save(sub / f"{name}.{ext}", quality=92)
  (d / "notes.txt").write_text("not an image")
  return str(d)


def cfg_for(path, source="files", batch=6, **data):
  cfg = config_lib.load_file(os.path.join(ROOT, "configs", "vision.py") + ":variant=tiny,runlocal")
  cfg.data.source, cfg.data.path = source, path
  cfg.batch_size = batch
  cfg.model.image_size, cfg.model.patch_size = 32, 8   # 16 patches
  cfg.data.num_mask_patches = 7
  cfg.data.min_mask_block = 4
  cfg.data.update(data)
  return cfg


def batches(cfg, n, start=0, p=0, count=1, workdir="/tmp/d2v_test_vision"):
  it = V.build_dataset(cfg, workdir, start_step=start, process_index=p, process_count=count)
  return [next(it) for _ in range(n)], it


def test_files_batches_shapes_masks_and_stats(photo_dir):
  cfg = cfg_for(photo_dir)
  assert V.list_images(photo_dir, cfg.data.extensions) == sorted(
      os.path.join(photo_dir, "a" if i % 2 else "b", f"{n}.{'png' if i % 2 else 'jpg'}")
      for i, n in enumerate(NAMES))
  out, it = batches(cfg, 4)
  for b in out:
    assert set(b) == {"image", "mask"}
    assert b["image"].shape == (6, 32, 32, 3) and b["image"].dtype == np.float32
    assert b["mask"].shape == (6, 16) and b["mask"].dtype == bool
    np.testing.assert_array_equal(b["mask"].sum(1), 7)
  imgs = np.concatenate([b["image"] for b in out])
  # Normalised real photos: roughly zero-mean / unit-std per channel, within the [0,1] range.
  lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
  assert (imgs >= lo - 1e-5).all() and (imgs <= hi + 1e-5).all()
  assert np.abs(imgs.mean((0, 1, 2))).max() < 0.8 and (imgs.std((0, 1, 2)) > 0.5).all()
  assert it.bad.count == 0
  # Every epoch (6 examples = 1 batch) shows each photo once: 6 different images.
  assert len({im.tobytes() for im in out[0]["image"]}) == 6


def test_crop_flip_normalise_exact(photo_dir):
  """Whole-image crop, no jitter: each output is the bicubic resize of a photo or its mirror."""
  cfg = cfg_for(photo_dir, crop_scale=(1.0, 1.0), crop_ratio=(4 / 3, 4 / 3), color_jitter=(0.0, 0.0, 0.0))
  out, _ = batches(cfg, 2)
  refs = []
  for name in NAMES:
    x = tf.image.resize(tf.constant(photo(name), tf.float32), [32, 32], "bicubic", antialias=True)
    x = (np.clip(x.numpy() / 255.0, 0, 1) - MEAN) / STD
    refs += [x, x[:, ::-1]]
  flips = 0
  for img in np.concatenate([b["image"] for b in out]):
    errs = [np.abs(img - r).max() for r in refs]
    k = int(np.argmin(errs))
    # PNG: exact; JPEG (quality 92): artefacts up to ~0.25 (normalised) at edges. Any other
    # photo / orientation is > 2 away.
    assert errs[k] < (1e-4 if NAMES[k // 2] in NAMES[1::2] else 0.3), errs[k]
    assert sorted(errs)[1] > 2.0
    flips += k % 2
  assert 0 < flips < 12                  # p = 0.5 flips happen, not always


def test_color_jitter_brightness_range(photo_dir):
  cfg = cfg_for(photo_dir, crop_scale=(1.0, 1.0), crop_ratio=(4 / 3, 4 / 3), flip=False,
                color_jitter=(0.4, 0.0, 0.0))
  plain = cfg_for(photo_dir, crop_scale=(1.0, 1.0), crop_ratio=(4 / 3, 4 / 3), flip=False,
                  color_jitter=(0.0, 0.0, 0.0))
  a, _ = batches(cfg, 1)
  b, _ = batches(plain, 1)
  ja = a[0]["image"] * STD + MEAN
  jb = b[0]["image"] * STD + MEAN
  for x, y in zip(ja, jb):
    keep = (y > 0.05) & (y < 0.6)        # away from 0 and from clipping at 1
    factor = np.median(x[keep] / y[keep])
    assert 0.6 - 1e-3 <= factor <= 1.4 + 1e-3
    np.testing.assert_allclose(x[keep], np.clip(y[keep] * factor, 0, 1), atol=2e-3)


def test_deterministic_resume_and_process_split(photo_dir):
  cfg = cfg_for(photo_dir, batch=4)
  a, _ = batches(cfg, 5)
  b, _ = batches(cfg, 5)
  resumed, _ = batches(cfg, 2, start=3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["mask"], y["mask"])
  for x, y in zip(a[3:], resumed):                       # batch s is a function of s alone
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["mask"], y["mask"])
  # Two processes with b = 2 read the two halves of the one-process global batch: same
  # examples, same augmentation (seeded by the global example number); masks differ per process.
  p0, _ = batches(cfg, 3, p=0, count=2)
  p1, _ = batches(cfg, 3, p=1, count=2)
  for s in range(3):
    assert p0[s]["image"].shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(np.concatenate([p0[s]["image"], p1[s]["image"]]), a[s]["image"])
  assert any((p0[s]["mask"] != p1[s]["mask"]).any() for s in range(3))


def _write_tfrecords(d, per_file=(4, 3), corrupt_record=None):
  paths, k = [], 0
  for f, n in enumerate(per_file):
    path = os.path.join(d, f"train-{f:05d}.tfrecord")
    with tf.io.TFRecordWriter(path) as w:
      for _ in range(n):
        data = tf.io.encode_jpeg(photo(NAMES[k % len(NAMES)])).numpy()
        if corrupt_record == (f, _):
          data = data[: len(data) // 2]
        feat = {"image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data]))}
        w.write(tf.train.Example(features=tf.train.Features(feature=feat)).SerializeToString())
        k += 1
    paths.append(path)
  return paths


def test_tfrecord_source_and_resume(tmp_path):
  _write_tfrecords(str(tmp_path))
  cfg = cfg_for(str(tmp_path / "*.tfrecord"), source="tfrecord", batch=3, image_key="image/encoded",
                shuffle_buffer=4)
  a, _ = batches(cfg, 6, workdir=str(tmp_path / "w"))    # 18 examples: 2.6 epochs of 7
  for b in a:
    assert b["image"].shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(b["mask"].sum(1), 7)
  again, _ = batches(cfg, 6, workdir=str(tmp_path / "w"))
  resumed, _ = batches(cfg, 2, start=4, workdir=str(tmp_path / "w"))   # mid epoch 1
  for x, y in zip(a, again):
    np.testing.assert_array_equal(x["image"], y["image"])
  for x, y in zip(a[4:], resumed):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["mask"], y["mask"])
  # Each epoch holds every record once: the first 7 examples are 7 different crops of
  # 6 photos, of which astronaut appears twice (records 0 and 6).
  assert len({im.tobytes() for b in a[:2] for im in b["image"]}) == 6


def test_tfds_source(tmp_path):
  import tensorflow_datasets as tfds

  class D2vTestPhotos(tfds.core.GeneratorBasedBuilder):
    """The six photos as a prepared tfds dataset (built offline, like a manual-download one)."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"image": tfds.features.Image(shape=(96, 128, 3))}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, name in enumerate(NAMES):
        yield i, {"image": photo(name)}

  D2vTestPhotos(data_dir=str(tmp_path)).download_and_prepare()
  cfg = cfg_for("d2v_test_photos", source="tfds", batch=3, tfds_data_dir=str(tmp_path),
                shuffle_buffer=6)
  a, it = batches(cfg, 4, workdir=str(tmp_path / "w"))
  resumed, _ = batches(cfg, 2, start=2, workdir=str(tmp_path / "w"))
  for b in a:
    assert b["image"].shape == (3, 32, 32, 3) and b["mask"].sum() == 21
  for x, y in zip(a[2:], resumed):
    np.testing.assert_array_equal(x["image"], y["image"])
  assert it.bad.count == 0
  missing = cfg_for("d2v_no_such_ds", source="tfds", tfds_data_dir=str(tmp_path))
  with pytest.raises(ConfigError, match="d2v_no_such_ds"):
    batches(missing, 1)


@pytest.fixture
def bad_dir(tmp_path, photo_dir):
  """4 good photos + a truncated JPEG, a truncated PNG, random bytes named .jpg, an empty file."""
  good = sorted(V.list_images(photo_dir, (".jpg", ".png")))[:4]
  for f in good:
    os.symlink(f, tmp_path / os.path.basename(f))
  src_jpg = next(f for f in good if f.endswith(".jpg"))
  src_png = next(f for f in good if f.endswith(".png"))
  jpg, png = open(src_jpg, "rb").read(), open(src_png, "rb").read()
  bad = {"trunc.jpg": jpg[: len(jpg) * 2 // 3], "trunc.png": png[: len(png) // 2],
         "noise.jpg": np.random.default_rng(0).bytes(3000), "empty.png": b""}
  for name, data in bad.items():
    (tmp_path / name).write_bytes(data)
  return str(tmp_path), sorted(str(tmp_path / n) for n in bad)


def test_bad_images_are_counted_and_skipped(bad_dir, capfd):
  path, bad = bad_dir
  cfg = cfg_for(path, batch=8)   # 8 files: each batch is one epoch
  out, it = batches(cfg, 2)
  assert it.bad.count == 8 and sorted(it.bad.paths) == bad   # 2 epochs: 8 skips, 4 files
  err = capfd.readouterr().err
  for p in bad:
    assert err.count(f"skipped bad image {p}:") == 1   # warned once; the second epoch only counts
  assert err.count("warning: ") == 4
  assert "truncated JPEG" in err and "Input is empty" in err
  for b in out:
    masked = b["mask"].sum(1)
    assert sorted(masked) == [0] * 4 + [7] * 4     # bad examples add nothing to the loss
    assert (b["image"][masked == 0] == 0).all()
    assert b["image"].shape == (8, 32, 32, 3)


def test_bad_image_stops_the_run_with_its_path(bad_dir):
  path, bad = bad_dir
  cfg = cfg_for(path, batch=8, on_bad_image="stop")
  with pytest.raises(V.BadImageError) as e:
    batches(cfg, 1)
  msg = str(e.value)
  assert "\n" not in msg and any(f"bad image {p}:" in msg for p in bad)
  assert "on_bad_image" in msg


def test_bad_tfrecord_is_named_by_file_and_record(tmp_path):
  paths = _write_tfrecords(str(tmp_path), per_file=(3,), corrupt_record=(0, 1))
  cfg = cfg_for(paths[0], source="tfrecord", batch=3, image_key="image/encoded", on_bad_image="stop")
  with pytest.raises(V.BadImageError, match=rf"bad image {paths[0]}\[record 1\]"):
    batches(cfg, 1)
  # A wrong feature key makes every record "bad": that is a config error, not skipping.
  wrong = cfg_for(paths[0], source="tfrecord", batch=3, image_key="image/jpeg")
  with pytest.raises(V.BadImageError, match="no image of a whole batch.*data.image_key"):
    batches(wrong, 1)


def test_runlocal_config_on_real_photos():
  if not os.path.isdir(PHOTOS):
    pytest.skip(f"{PHOTOS} missing: run .ci/setup (.ci/data/vision.sh writes the photos)")
  cfg = config_lib.load_file(os.path.join(ROOT, "configs", "vision.py") + ":variant=tiny,runlocal")
  V.prepare(cfg, "/tmp")
  V.validate(cfg)
  assert cfg.data.num_mask_patches == 39                # round(120/196 * 64)
  out, it = batches(cfg, 2)
  assert out[0]["image"].shape == (16, 64, 64, 3)
  np.testing.assert_array_equal(out[1]["mask"].sum(1), 39)
  assert it.bad.count == 0
  ex = V.example_batch(cfg, 5)
  assert ex["image"].shape == (5, 64, 64, 3) and ex["mask"].shape == (5, 64)
  np.testing.assert_array_equal(ex["mask"].sum(1), 39)


def test_base_config_matches_released_recipe():
  cfg = config_lib.load_file(os.path.join(ROOT, "configs", "vision.py") + ":variant=base")
  V.prepare(cfg, "/tmp")
  V.validate(cfg)
  validate.validate(cfg)
  assert cfg.data.num_mask_patches == 120 and (cfg.model.image_size, cfg.model.patch_size) == (224, 16)
  assert cfg.total_steps == 500_000 and cfg.optim.warmup_steps == 6_250   # 800 / 10 epochs at 2048
  assert cfg.teacher.ema_subtrees == ("embed", "encoder") and cfg.target.top_k == 6
  assert (cfg.loss.beta, cfg.loss.reduce_dims, cfg.target.final_norm) == (2.0, "mean", "layer")
  assert (cfg.data.source, cfg.data.path) == ("tfds", "imagenet2012")


@pytest.mark.parametrize("key, value, match", [
    ("model.image_size", 30, "not divisible"),
    ("data.num_mask_patches", 17, "num_mask_patches=17"),
    ("data.min_mask_block", 8, "min_mask_block=8"),
    ("data.on_bad_image", "ignore", "on_bad_image"),
    ("data.source", "http", "data.source"),
    ("data.crop_scale", (0.5, 0.2), "crop_scale"),
])
def test_validate_names_the_key(photo_dir, key, value, match):
  cfg = cfg_for(photo_dir)
  set_path(cfg, key, value)
  with pytest.raises(ConfigError, match=match):
    V.validate(cfg)


def test_empty_source_is_a_config_error(tmp_path):
  with pytest.raises(ConfigError, match="matches no image file"):
    batches(cfg_for(str(tmp_path)), 1)
