"""Where examples come from, for every modality: files, TFRecords or tfds, and what to do with
a bad record. The modality modules keep decoding, preprocessing and masking.

  data.source         files | tfrecord | tfds (SOURCES)
  data.path           files: comma-separated globs and / or directories (a directory: every
                      file below it that the modality reads); tfrecord: globs and / or
                      directories of TFRecord files; tfds: a dataset name or its prepared
                      directory (never downloaded)
  data.tfds_data_dir  where tfds looks for a named dataset ("" = the tfds default)
  data.threads        tf.data private thread pool size (0 = tf.data's default)

Bad records (BadRecords): the modality's policy key (vision data.on_bad_image, audio
data.on_bad_file) either stops at the first one with one line naming it and the key to
change, or skips it: the first time a record is skipped it is named on stderr with why, later
skips are only counted.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile

import tensorflow as tf

from d2v_jax.config import ConfigError

SOURCES = ("files", "tfrecord", "tfds")


def expand(pattern: str, what: str, keep=lambda name: True, *, filter_globs: bool = False) -> list[str]:
  """Comma-separated globs and directories -> sorted file paths. A directory contributes the
  files below it (recursively) whose name passes keep(name); a glob what it matches (only
  those that pass keep with filter_globs). ConfigError naming `what` when nothing matches."""
  files: set[str] = set()
  for p in (x.strip() for x in pattern.split(",")):
    if not p:
      continue
    if tf.io.gfile.isdir(p):
      for root, _, names in tf.io.gfile.walk(p):
        files.update(os.path.join(root, n) for n in names if keep(n))
    else:
      files.update(f for f in tf.io.gfile.glob(p)
                   if not tf.io.gfile.isdir(f) and (keep(os.path.basename(f)) or not filter_globs))
  if not files:
    raise ConfigError(f"data.path={pattern!r} matches no {what}; check the path")
  return sorted(files)


def record_files(pattern: str) -> list[str]:
  """TFRecord files of globs and / or directories (a directory: names containing .tfrecord)."""
  return expand(pattern, "TFRecord file", lambda n: ".tfrecord" in n.lower())


def tfds_builder(cfg, feature_key: str):
  """The prepared tfds builder of data.path (a name, found in data.tfds_data_dir, or a
  directory) that has feature `feature_key`; one ConfigError line otherwise."""
  import tensorflow_datasets as tfds  # ~1 s of import: only runs that read tfds pay it
  path = cfg.data.path
  if not path:
    raise ConfigError("data.path is empty; set --config.data.path to a tfds name or directory")
  try:
    if tf.io.gfile.isdir(path):
      builder = tfds.builder_from_directory(path)
    else:
      builder = tfds.builder(path, data_dir=cfg.data.tfds_data_dir or None)
  except Exception as e:  # tfds raises many types for unknown names / bad dirs
    raise ConfigError(f"data.path={path!r} is not a tfds dataset: {str(e).splitlines()[0]}") from None
  if not tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json")):
    raise ConfigError(
        f"tfds dataset {path!r} is not prepared in {builder.data_dir} (nothing is downloaded "
        "here): prepare it, set data.tfds_data_dir, or set data.path to its directory")
  if feature_key not in builder.info.features:
    raise ConfigError(f"tfds dataset {path!r} has no feature {feature_key!r}; features: "
                      f"{sorted(builder.info.features.keys())}")
  return builder


def local_dir(workdir: str) -> str:
  """A local directory for a run's caches (memmaps, tokenizers, indexes need a local
  filesystem): the run directory itself, or a temp dir keyed by it when it is remote."""
  if "://" not in workdir:
    return workdir
  return os.path.join(tempfile.gettempdir(), "d2v_jax",
                      hashlib.sha256(workdir.encode()).hexdigest()[:16])


def options(cfg) -> tf.data.Options:
  """Deterministic tf.data (batches are pure functions of the step) on data.threads threads."""
  opts = tf.data.Options()
  opts.deterministic = True
  if cfg.data.threads:
    opts.threading.private_threadpool_size = int(cfg.data.threads)
  return opts


def checks(cfg, need_path: bool = True) -> list[tuple[bool, str]]:
  """The source keys' range checks (the modality's validate raises the first failing one).
  need_path=False: an empty data.path is only an error once the data is read (text: models
  build without a corpus for benchmarks and AOT compiles)."""
  d = cfg.data
  return [(d.source in SOURCES, f"data.source={d.source!r} must be one of {SOURCES}"),
          (bool(d.path) or not need_path, "data.path is empty; set --config.data.path (files / "
                                          "TFRecords: globs or directories; tfds: a name or directory)"),
          (int(d.threads) >= 0, f"data.threads={d.threads} must be >= 0 (0 = tf.data's default)")]


class BadRecords:
  """A source's bad-record policy: `key` (e.g. data.on_bad_image) says skip or stop.

  bad(src, why): with skip, counted, and named on stderr the first time src is skipped;
  otherwise raises `error` with one line naming src and the key that would skip it."""

  def __init__(self, what: str, key: str, skip: bool, error=ConfigError, keep: int = 1000,
               report: bool = True):
    self.what, self.key, self.skip_bad, self.error, self.keep = what, key, skip, error, keep
    self.report = report   # False: count only (processes other than 0 of a job)
    self.count = 0                 # skips, every one counted
    self.paths: list[str] = []     # distinct sources, the first `keep`
    self._seen: set[str] = set()

  def bad(self, src: str, why: str) -> None:
    if not self.skip_bad:
      raise self.error(f"bad {self.what} {src}: {why}; fix or remove it, or set "
                       f"--config.{self.key}=skip")
    self.count += 1
    if src in self._seen:
      return
    self._seen.add(src)
    if len(self.paths) < self.keep:
      self.paths.append(src)
    if self.report:
      print(f"warning: skipped bad {self.what} {src}: {why} ({self.key}=skip; {len(self._seen)} "
            f"bad, {self.count} skips so far; later skips of it are only counted)",
            file=sys.stderr, flush=True)
