"""Sensor recordings: data.path = globs / directories of .npy files [samples, channels], cut
into non-overlapping windows of data.window samples. Batch `s` of process `p` is a pure
function of (seed, s, p): the order of d2v_jax/data/order.py and masks from a numpy generator
seeded by (seed, s, p), data.mask_prob of the window's patches masked, exactly, per row."""

from __future__ import annotations

import os

import numpy as np

from d2v_jax.config import ConfigError
from d2v_jax.data import labelled, order, sources


def tokens(cfg) -> int:
  return int(cfg.data.window) // int(cfg.model.patch)


def validate(cfg) -> None:
  m, d = cfg.model, cfg.data
  for ok, msg in [(d.window % m.patch == 0, f"data.window={d.window} is not a multiple of "
                   f"model.patch={m.patch}"),
                  (0.0 < d.mask_prob < 1.0, f"data.mask_prob={d.mask_prob} must be in (0, 1)"),
                  (m.channels >= 1, f"model.channels={m.channels} must be >= 1")]:
    if not ok:
      raise ConfigError(msg)


def _files(path: str) -> list[str]:
  return sources.expand(path, "sensor file (.npy)", lambda n: n.endswith(".npy"), filter_globs=True)


def _load(path: str, cfg) -> np.ndarray:
  x = np.load(path).astype(np.float32)
  if x.ndim != 2 or x.shape[1] != cfg.model.channels:
    raise ConfigError(f"sensor file {path}: shape {x.shape}, expected [samples, "
                      f"model.channels={cfg.model.channels}]")
  return x


def windows(cfg) -> np.ndarray:
  """float32 [N, window, channels]: every whole window of every recording, in file order."""
  w = int(cfg.data.window)
  out = [x[: len(x) // w * w].reshape(-1, w, x.shape[1]) for x in
         (_load(f, cfg) for f in _files(cfg.data.path))]
  out = np.concatenate(out) if out else np.zeros((0, w, cfg.model.channels), np.float32)
  if not len(out):
    raise ConfigError(f"data.path={cfg.data.path!r} holds no window of data.window={w} samples")
  return out


def masks(cfg, rng: np.random.Generator, b: int) -> np.ndarray:
  t = tokens(cfg)
  k = int(round(t * float(cfg.data.mask_prob)))
  order_ = np.argsort(rng.random((b, t)), axis=1)
  out = np.zeros((b, t), bool)
  np.put_along_axis(out, order_[:, :k], True, axis=1)
  return out


def prepare(cfg, workdir: str) -> None:
  del workdir
  windows(cfg)   # a bad path or file fails at start-up


def resolve_offline(cfg, workdir: str) -> None:
  del cfg, workdir   # nothing in the config depends on the data


def build_dataset(cfg, workdir: str, *, start_step: int, process_index: int, process_count: int):
  del workdir
  data = windows(cfg)
  b = order.per_process_batch(cfg.batch_size, process_count)
  step = start_step
  while True:
    idx = order.example_indices(step, num_examples=len(data), global_batch=cfg.batch_size,
                                seed=cfg.seed, process_index=process_index,
                                process_count=process_count).numpy()
    rng = np.random.default_rng([cfg.seed, step, process_index])
    yield {"signal": data[idx], "mask": masks(cfg, rng, b)}
    step += 1


def example_batch(cfg, batch_size: int) -> dict:
  return {"signal": np.zeros((batch_size, cfg.data.window, cfg.model.channels), np.float32),
          "mask": masks(cfg, np.random.default_rng(0), batch_size)}


def synthetic_batch(cfg, batch_size: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {"signal": rng.normal(size=(batch_size, cfg.data.window, cfg.model.channels)).astype(np.float32),
          "mask": masks(cfg, rng, batch_size)}


def labelled_set(cfg, workdir, path: str) -> labelled.LabelledSet:
  """A folder per class of .npy recordings; each gives its first window."""
  del workdir
  files, names = labelled.class_folders(path, (".npy",))
  w = int(cfg.data.window)
  signals = []
  for f in files:
    x = _load(f, cfg)
    if len(x) < w:
      raise ConfigError(f"sensor file {f} has {len(x)} samples, fewer than data.window={w}")
    signals.append(x[:w])
  y, classes = labelled.label_ids(names)
  arrays = {"signal": np.stack(signals), "mask": np.zeros((len(files), tokens(cfg)), bool)}
  return labelled.LabelledSet(arrays, y, classes, [os.path.relpath(f, path) for f in files])
