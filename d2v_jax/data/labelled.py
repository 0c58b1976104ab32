"""Labelled probe sets on disk, before a modality preprocesses them (data/<m>.py labelled_set):
a `text<TAB>label` TSV (text) or a folder per class (images, audio)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from d2v_jax.config import ConfigError


@dataclasses.dataclass
class LabelledSet:
  arrays: dict          # model inputs (numpy), leading dim N, as the modality's batches
  labels: np.ndarray    # int32 [N]
  classes: list         # class names, label i -> classes[i]
  names: list           # per example: file path or text (for reports)


def label_ids(names: list[str]) -> tuple[np.ndarray, list[str]]:
  """Class names per example -> (int32 labels, sorted class names)."""
  classes = sorted(set(names))
  index = {c: i for i, c in enumerate(classes)}
  return np.asarray([index[n] for n in names], np.int32), classes


def read_tsv(path: str) -> tuple[list[str], list[str]]:
  """`text<TAB>label` lines (blank lines skipped) -> (texts, labels)."""
  if not os.path.isfile(path):
    raise ConfigError(f"probe data {path!r} is not a file; text probes read a text<TAB>label TSV")
  texts, labels = [], []
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().split("\n")
  except UnicodeDecodeError as e:   # a binary file (or another encoding) given as the TSV
    raise ConfigError(f"probe data {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                      "text probes read a text<TAB>label TSV") from None
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    text, tab, label = line.rpartition("\t")
    if not tab or not text.strip() or not label.strip():
      raise ConfigError(f"{path}:{n}: expected `text<TAB>label`, got {line[:60]!r}")
    texts.append(text.strip())
    labels.append(label.strip())
  if not texts:
    raise ConfigError(f"{path} holds no `text<TAB>label` line")
  return texts, labels


def class_folders(path: str, extensions, lister=None) -> tuple[list[str], list[str]]:
  """A folder per class -> (files, class names); files sorted, classes = folder names.
  `lister(dir)` (the trainer's own file lister, e.g. audio.list_files) finds the files of a
  class folder; without it, the files below it whose extension is in `extensions`."""
  if not os.path.isdir(path):
    raise ConfigError(f"probe data {path!r} is not a directory; image / audio probes read a "
                      "folder per class (PATH/<class>/<files>)")
  exts = tuple(e.lower() for e in extensions)
  files, labels = [], []
  for cls in sorted(os.listdir(path)):
    d = os.path.join(path, cls)
    if not os.path.isdir(d):
      continue
    if lister is not None:
      try:
        found = sorted(lister(d))
      except ConfigError:
        found = []
    else:
      found = sorted(os.path.join(root, n) for root, _, names in os.walk(d, followlinks=True)
                     for n in names if n.lower().endswith(exts))
    if not found:
      raise ConfigError(f"class folder {d} holds no file with extension in {sorted(set(exts))}")
    files += found
    labels += [cls] * len(found)
  if len(set(labels)) < 2:
    raise ConfigError(f"{path} needs at least two class folders with files; found {sorted(set(labels))}")
  return files, labels
