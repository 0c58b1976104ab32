"""The text corpus: reading text units from files, TFRecords or tfds, encoding them into one
token stream, packing it into blocks and caching the blocks (RoBERTa FULL-SENTENCES: </s>
after every document, cut into block_size - 2 tokens, each wrapped as <s> chunk </s>; the
ragged tail is dropped; cached as int32 .npy keyed by (sources, sizes, mtimes, tokenizer,
block_size)). Long passes print progress lines with counts and ETA every PROGRESS_EVERY
seconds once they take longer than PROGRESS_AFTER seconds."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import tempfile
import threading
import time
from typing import Iterator

import ml_collections
import numpy as np
import tensorflow as tf

from d2v_jax.config import ConfigError
from d2v_jax.data import sources
from d2v_jax.data.text_tokenizer import (bos_eos, corpus_encoder, load_tokenizer, tokenizer_hash,
                                         train_tokenizer)

_READ_BATCH = 4096      # text units per tokenizer call
_CACHE_VERSION = 2      # bump when packing changes (2: tokenizer padding / truncation off)
MAX_UNK_FRAC = 0.05     # default of data.max_unk_frac
PROGRESS_AFTER = 5.0    # seconds before the first progress line
PROGRESS_EVERY = 10.0   # seconds between progress lines


def _log(msg: str) -> None:
  """One console line from process 0 (every process prepares the data)."""
  jax = sys.modules.get("jax")
  if jax is not None and jax.process_index() != 0:
    return
  print(msg, flush=True)


class Progress:
  """Periodic progress lines (counts, rate, ETA when the total size is known) for a long
  loop; silent when the loop is done within PROGRESS_AFTER seconds."""

  def __init__(self, what: str, total_bytes: int | None = None):
    self.what, self.total = what, total_bytes
    self.t0 = self.last = time.time()
    self.units = self.tokens = self.bytes = 0
    self.printed = False

  def update(self, units: int, nbytes: int, tokens: int = 0) -> None:
    self.units += units
    self.bytes += nbytes
    self.tokens += tokens
    self.maybe_log(self.line)

  def maybe_log(self, line) -> None:
    """_log(line(now)) when due: silent for PROGRESS_AFTER s, then every PROGRESS_EVERY s."""
    now = time.time()
    if now - self.t0 >= PROGRESS_AFTER and (not self.printed or now - self.last >= PROGRESS_EVERY):
      self.last = now
      self.printed = True
      _log(line(now))

  def line(self, now: float) -> str:
    dt = max(now - self.t0, 1e-9)
    msg = f"{self.what}: {self.units:,} lines"
    if self.tokens:
      msg += f", {self.tokens:,} tokens"
    msg += f", {self.bytes / 2**20:,.1f} MiB ({self.bytes / 2**20 / dt:.1f} MiB/s)"
    if self.total:
      frac = min(self.bytes / self.total, 1.0)
      eta = (1 - frac) * dt / max(frac, 1e-9)
      msg += f" | {100 * frac:.0f}% of {self.total / 2**20:,.1f} MiB | ETA {_hms(eta)}"
    return msg

  def elapsed(self) -> float:
    return time.time() - self.t0


class _Heartbeat:
  """A line every PROGRESS_EVERY seconds while a call that reports nothing runs (the BPE
  merge computation happens inside `tokenizers`, which releases the GIL but has no progress
  hook for non-terminals). It speaks only once `progress` has consumed its input, so the
  reading phase keeps its own lines; silent when the whole phase takes < PROGRESS_AFTER."""

  def __init__(self, progress: Progress, line):
    self.progress, self.line = progress, line
    self.done = threading.Event()
    self.thread = threading.Thread(target=self._beat, daemon=True)
    self.t_read = None

  def _beat(self):
    while not self.done.wait(max(min(PROGRESS_EVERY, 1.0), 0.01)):
      if self.t_read is not None:
        self.progress.maybe_log(lambda now: self.line(now - self.t_read))

  def reading_done(self):
    self.t_read = time.time()

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.done.set()
    self.thread.join()


def _hms(seconds: float) -> str:
  s = int(round(seconds))
  return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def resolve_tokenizer(cfg: ml_collections.ConfigDict, workdir: str):
  """cfg.data.tokenizer, or a BPE trained on the corpus into WORKDIR/tokenizer (once)."""
  if cfg.data.tokenizer:
    return load_tokenizer(cfg.data.tokenizer)
  out = os.path.join(sources.local_dir(workdir), "tokenizer")
  if not os.path.isdir(out):
    progress = Progress(f"training tokenizer (vocab {cfg.data.vocab_size}): read",
                        _total_bytes(cfg))

    heartbeat = _Heartbeat(progress, lambda dt: f"training tokenizer: computing merges "
                           f"(vocab {cfg.data.vocab_size}), {dt:.0f} s so far")

    def units():
      for u in text_units(cfg):
        progress.update(1, len(u) + 1)
        yield u
      heartbeat.reading_done()
      if progress.printed:
        _log(f"training tokenizer: read {progress.units:,} lines in {progress.elapsed():.0f} s; "
             "computing merges")

    with heartbeat:
      train_tokenizer(units(), cfg.data.vocab_size, out)
    if progress.printed:
      _log(f"training tokenizer: done in {progress.elapsed():.0f} s ({out})")
  return load_tokenizer(out)


def corpus_files(cfg) -> list[str]:
  """The corpus files of data.path (text files, or TFRecord files for data.source=tfrecord);
  an empty one is an error naming it."""
  path = cfg.data.path
  if not path:
    raise ConfigError("data.path is empty; set --config.data.path to a glob of the corpus")
  files = (sources.record_files(path) if cfg.data.source == "tfrecord"
           else sources.expand(path, "text file"))
  for f in files:
    if tf.io.gfile.stat(f).length == 0:
      raise ConfigError(f"text file {f} is empty (0 bytes); remove it or fix data.path")
  return files


def _sources(cfg) -> list:
  """What the cache key depends on: files with size and mtime, or the tfds identity."""
  if cfg.data.source == "tfds":
    b = sources.tfds_builder(cfg, cfg.data.text_key)
    return [b.name, str(b.version), b.data_dir, cfg.data.split, cfg.data.text_key]
  out = [cfg.data.source, cfg.data.text_key if cfg.data.source == "tfrecord" else ""]
  for f in corpus_files(cfg):
    st = tf.io.gfile.stat(f)
    out.append([f, st.length, st.mtime_nsec])
  return out


def _check_text(path: str, chunk) -> None:
  """The first lines of a corpus file must be text: NUL bytes or mostly undecodable bytes
  mean a binary file (an archive, an image, a .npy) matched by data.path."""
  sample = b"\n".join(chunk)[:1 << 16]
  nul = sample.count(b"\x00")
  # Text in another 8-bit encoding (latin-1 accents) stays well under 10 % undecodable.
  undecodable = sample.decode("utf-8", errors="replace").count("\ufffd")
  if sample and (nul > 0.001 * len(sample) or undecodable > 0.1 * len(sample)):
    raise ConfigError(f"text file {path} is not text ({nul} NUL and {undecodable} non-UTF-8 "
                      f"bytes in its first {len(sample)}); remove it from data.path or fix the "
                      "glob")


def _read_lines(path: str) -> Iterator[str | None]:
  """Lines of one text file; None for a blank line (document end)."""
  any_text = False
  ds = tf.data.TextLineDataset(path).batch(_READ_BATCH).prefetch(1)
  for i, chunk in enumerate(ds.as_numpy_iterator()):
    if i == 0:
      _check_text(path, chunk)
    for raw in chunk:
      line = raw.decode("utf-8", errors="replace").strip()
      if line:
        any_text = True
        yield line
      else:
        yield None
  if not any_text:
    raise ConfigError(f"text file {path} is empty (only whitespace); remove it or fix data.path")


def _read_records(cfg) -> Iterator[str | None]:
  """One document per record (tfrecord / tfds), each followed by None."""
  key = cfg.data.text_key
  if cfg.data.source == "tfds":
    b = sources.tfds_builder(cfg, key)
    datasets = [("tfds " + cfg.data.path, b.as_dataset(split=cfg.data.split).map(lambda e: e[key]))]
  else:
    spec = {key: tf.io.FixedLenFeature([], tf.string, default_value="")}
    parse = lambda r: tf.io.parse_single_example(r, spec)[key]  # noqa: E731
    datasets = [(f, tf.data.TFRecordDataset(f).map(parse)) for f in corpus_files(cfg)]
  for name, ds in datasets:
    any_text = False
    try:
      for chunk in ds.batch(_READ_BATCH).prefetch(1).as_numpy_iterator():
        for raw in chunk:
          text = raw.decode("utf-8", errors="replace").strip()
          if text:
            any_text = True
            yield text
            yield None
    except tf.errors.OpError as e:
      raise ConfigError(f"{name}: cannot read records: {e.message.splitlines()[0]}") from None
    if not any_text:
      raise ConfigError(f"{name} holds no text in feature {key!r}; remove it or fix data.path")


def _raw_units(cfg) -> Iterator[str | None]:
  if cfg.data.source == "files":
    for f in corpus_files(cfg):
      yield from _read_lines(f)
      yield None  # a file ends its last document
  elif cfg.data.source in ("tfrecord", "tfds"):
    yield from _read_records(cfg)
  else:
    raise ConfigError(f"data.source={cfg.data.source!r} must be one of {sources.SOURCES}")


def _units(cfg) -> Iterator[str | None]:
  """Non-empty text units of the corpus, and exactly one None after each document.

  A unit that continues a document gets a leading space: wrapped lines join like words of
  one paragraph ("face of" + "the deep" -> "face of the deep"), as byte-level BPE expects.
  """
  open_doc = False
  for u in _raw_units(cfg):
    if u is None:
      if open_doc:
        yield None
      open_doc = False
    else:
      yield " " + u if open_doc else u
      open_doc = True


def text_units(cfg) -> Iterator[str]:
  return (u for u in _units(cfg) if u is not None)


def _total_bytes(cfg) -> int | None:
  """Size of the corpus files (progress ETA); None for tfrecord / tfds."""
  if cfg.data.source != "files":
    return None
  try:
    return sum(tf.io.gfile.stat(f).length for f in corpus_files(cfg))
  except ConfigError:
    return None


def token_stream(cfg, tok, progress: Progress | None = None) -> np.ndarray:
  """int32 stream of the corpus: tokens of each document followed by </s> (the eos)."""
  _, eos = bos_eos(tok)
  backend = corpus_encoder(tok)
  encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # no offsets: faster
  pieces: list = []
  units = _units(cfg)
  while chunk := list(itertools.islice(units, _READ_BATCH)):
    texts = [u for u in chunk if u is not None]
    ids = [e.ids for e in encode(texts, add_special_tokens=False)]
    it = iter(ids)
    pieces += [(eos,) if u is None else next(it) for u in chunk]
    if progress is not None:
      progress.update(len(texts), sum(map(len, texts)) + len(texts), sum(map(len, ids)))
  stream = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int32)
  # Literal "<mask>" / "[CLS]" text in the corpus must not become a special token mid-stream.
  literal = np.isin(stream, list(set(tok.all_special_ids) - {eos}))
  if tok.unk_token_id is not None:
    stream[literal] = tok.unk_token_id
  else:
    stream = stream[~literal]
  return stream


def unk_fraction(stream: np.ndarray, tok) -> float:
  if tok.unk_token_id is None or len(stream) == 0:
    return 0.0
  return float(np.count_nonzero(stream == tok.unk_token_id) / len(stream))


def _check_unk(cfg, tok, frac: float, tokens: int) -> None:
  limit = float(cfg.data.max_unk_frac)
  if frac > limit:
    raise ConfigError(
        f"tokenizer {tok.name_or_path!r} turns {100 * frac:.1f}% of the {tokens:,} corpus tokens "
        f"into its unknown token {tok.unk_token!r} (data.max_unk_frac={limit}): it does not fit "
        "this text (vocabulary, casing or normalisation); use a matching tokenizer, or none to "
        "train one")


def pack(stream: np.ndarray, block_size: int, bos: int, eos: int) -> np.ndarray:
  """[N, block_size] int32: <s> + block_size - 2 tokens + </s>; drops the ragged tail."""
  n = len(stream) // (block_size - 2)
  body = stream[: n * (block_size - 2)].reshape(n, block_size - 2)
  out = np.empty((n, block_size), np.int32)
  out[:, 0], out[:, 1:-1], out[:, -1] = bos, body, eos
  return out


def blocks(cfg, workdir: str, tok) -> str:
  """Path of the packed [N, block_size] int32 .npy; packs the corpus if it is not cached."""
  key = json.dumps([_CACHE_VERSION, _sources(cfg), tokenizer_hash(tok), cfg.data.block_size])
  cache = cfg.data.cache_dir or os.path.join(sources.local_dir(workdir), "data_cache")
  path = os.path.join(cache, hashlib.sha256(key.encode()).hexdigest()[:20] + ".npy")
  if os.path.exists(path):
    _check_cache(path)
    stats = read_stats(path)
    if stats:
      _check_unk(cfg, tok, stats["unk_frac"], stats["tokens"])
    return path
  progress = Progress("caching corpus", _total_bytes(cfg))
  stream = token_stream(cfg, tok, progress)
  frac = unk_fraction(stream, tok)
  _check_unk(cfg, tok, frac, len(stream))
  blocks = pack(stream, cfg.data.block_size, *bos_eos(tok))
  if len(blocks) == 0:
    raise ConfigError(
        f"corpus data.path={cfg.data.path!r} has {len(stream)} tokens, fewer than one block of "
        f"data.block_size={cfg.data.block_size}; add text or lower block_size")
  os.makedirs(cache, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".blocks.", dir=cache)
  with os.fdopen(fd, "wb") as f:
    np.save(f, blocks)
  os.chmod(tmp, 0o644)  # mkstemp makes it private
  stats = {"tokens": int(len(stream)), "unk_frac": frac, "blocks": int(len(blocks))}
  with open(path + ".json.tmp", "w") as f:
    json.dump(stats, f)
  os.replace(path + ".json.tmp", path + ".json")
  os.replace(tmp, path)
  _log(f"cached corpus: {len(stream):,} tokens -> {len(blocks):,} blocks of "
       f"{cfg.data.block_size}, {100 * frac:.2f}% unknown tokens ({progress.elapsed():.0f} s)")
  return path


def _check_cache(path: str) -> None:
  """A cached block file that does not read back (truncated, overwritten) is one error naming
  it: it is derived data, rebuilt from the corpus once deleted."""
  try:
    arr = np.load(path, mmap_mode="r")
    why = None if arr.ndim == 2 and arr.dtype == np.int32 else f"holds {arr.dtype} {arr.shape}"
  except (OSError, ValueError, EOFError) as e:
    why = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
  if why:
    raise ConfigError(f"cached corpus {path} is damaged ({why}); delete it (it is rebuilt from "
                      "data.path at the next start)")


def read_stats(path: str) -> dict | None:
  try:
    with open(path + ".json") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None
