"""Text input for data2vec-text: tokenizer, corpus packing, ordered batches with masks.

  python -m d2v_jax.data.text train-tokenizer --input 'data/text/*.txt' --out tok --vocab-size 8192
  python -m d2v_jax.data.text prepare --config configs/text.py:variant=tiny,runlocal \
      --workdir runs/x

Corpus (cfg.data.source): "files" (glob of plain text; a line is a text unit, a blank line
ends a document), "tfrecord" (glob of tf.train.Example records with a bytes feature
cfg.data.text_key; a record is a document) or "tfds" (a tfds name or a prepared tfds
directory in cfg.data.path, split cfg.data.split, never downloaded). All are read with tf.data.

Packing is RoBERTa FULL-SENTENCES: one token stream with </s> after every document, cut into
block_size - 2 tokens, each wrapped as <s> chunk </s>; the ragged tail is dropped. Blocks are
cached as int32 .npy keyed by (sources, sizes, mtimes, tokenizer, block_size).

A given tokenizer (data.tokenizer: any HF fast tokenizer directory) is used as a tokenizer
only: the padding and truncation its tokenizer.json may switch on are switched off for corpus
encoding, and the special tokens are its own. Block delimiters are its bos / eos tokens
(<s> </s>), or cls / sep ([CLS] [SEP]) when it has none; the pad and mask tokens are its pad
and mask tokens, and model.pad_id follows the tokenizer unless it was set on the command line.
The share of the corpus that encodes to the unknown token is printed with the cache; above
data.max_unk_frac (default 0.05) the run stops with one line (a tokenizer that does not fit
the text: wrong vocabulary, casing or normalisation). Tokenizer training and corpus caching
print a progress line with counts and ETA every PROGRESS_EVERY seconds once they take longer
than PROGRESS_AFTER seconds.

Batches follow d2v_jax/data/order.py (step -> indices, O(1) resume, disjoint per process) and
are masked per batch by d2v_jax/data/masking_text.py: {"source", "student", "mask"}.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Iterator

import ml_collections
import numpy as np
import tensorflow as tf

from d2v_jax.config import ConfigError
from d2v_jax.data import labelled, masking_v2, order
from d2v_jax.data.masking_text import MaskSpec, mask_tokens

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3; <mask> is the last id
SOURCES = ("files", "tfrecord", "tfds")
_MASK_SALT = 0x7E47     # separates the mask stream from the order stream (same cfg.seed)
_READ_BATCH = 4096      # text units per tokenizer call
_CONST_BYTES = 256 << 20  # blocks up to this size live in a tf constant; above: memmap
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


# ---------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts, vocab_size: int, out_dir: str) -> None:
  """RoBERTa-style byte-level BPE on `texts` (iterable of str), saved as an HF fast
  tokenizer dir: <s>=0 <pad>=1 </s>=2 <unk>=3, <mask> = last id. Deterministic for a given
  corpus. Written to a temporary dir and renamed, so concurrent processes never see half."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import RobertaTokenizerFast

  if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
    raise ConfigError(f"tokenizer vocab_size={vocab_size} must be >= 261 (256 bytes + 5 specials)")
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size - 1, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  tok.add_special_tokens(["<mask>"])
  tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
  hf = RobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            sep_token="</s>", cls_token="<s>", unk_token="<unk>",
                            pad_token="<pad>", mask_token="<mask>", add_prefix_space=False,
                            model_max_length=1_000_000)
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tokenizer.", dir=parent)
  hf.save_pretrained(tmp)
  os.chmod(tmp, 0o755)  # mkdtemp makes it private
  try:
    os.rename(tmp, out_dir)
  except OSError:  # another process got there first (same corpus -> same tokenizer)
    shutil.rmtree(tmp, ignore_errors=True)
    if not os.path.isdir(out_dir):
      raise


def load_tokenizer(path: str):
  from transformers import AutoTokenizer
  try:
    return AutoTokenizer.from_pretrained(path, use_fast=True)
  except (OSError, ValueError) as e:
    raise ConfigError(f"data.tokenizer={path!r} cannot be loaded as an HF tokenizer: "
                      f"{str(e).splitlines()[0]}") from None


def _local_dir(workdir: str) -> str:
  """Tokenizer and block cache need a local filesystem (memmap, save_pretrained)."""
  if "://" not in workdir:
    return workdir
  return os.path.join(tempfile.gettempdir(), "d2v_jax",
                      hashlib.sha256(workdir.encode()).hexdigest()[:16])


def resolve_tokenizer(cfg: ml_collections.ConfigDict, workdir: str):
  """cfg.data.tokenizer, or a BPE trained on the corpus into WORKDIR/tokenizer (once)."""
  if cfg.data.tokenizer:
    return load_tokenizer(cfg.data.tokenizer)
  out = os.path.join(_local_dir(workdir), "tokenizer")
  if not os.path.isdir(out):
    progress = Progress(f"training tokenizer (vocab {cfg.data.vocab_size}): read",
                        _total_bytes(cfg))

    heartbeat = _Heartbeat(progress, lambda dt: f"training tokenizer: computing merges "
                           f"(vocab {cfg.data.vocab_size}), {dt:.0f} s so far")

    def units():
      for u in _text_units(cfg):
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


def corpus_encoder(tok):
  """A copy of tok's Rust tokenizer with padding and truncation off (a published
  tokenizer.json often pads and truncates every encoding to 128 or 512 tokens)."""
  from tokenizers import Tokenizer
  backend = getattr(tok, "backend_tokenizer", None)
  if backend is None:
    raise ConfigError(f"tokenizer {tok.name_or_path!r} is not a fast tokenizer (no "
                      "tokenizer.json); save it with a `tokenizers` backend")
  backend = Tokenizer.from_str(backend.to_str())
  backend.no_padding()
  backend.no_truncation()
  return backend


def _tokenizer_hash(tok) -> str:
  path = tok.name_or_path
  h = hashlib.sha256(type(tok).__name__.encode())
  if os.path.isdir(path):
    for name in sorted(os.listdir(path)):
      h.update(name.encode())
      with open(os.path.join(path, name), "rb") as f:
        h.update(f.read())
  else:
    h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
  return h.hexdigest()


# ------------------------------------------------------------------------------ sources


def _glob(pattern: str) -> list[str]:
  if not pattern:
    raise ConfigError("data.path is empty; set --config.data.path to a glob of the corpus")
  files = sorted({f for p in pattern.split(",") if p.strip() for f in tf.io.gfile.glob(p.strip())})
  if not files:
    raise ConfigError(f"data.path={pattern!r} matches no file; check the glob")
  for f in files:
    if tf.io.gfile.stat(f).length == 0:
      raise ConfigError(f"text file {f} is empty (0 bytes); remove it or fix data.path")
  return files


def _tfds_builder(cfg):
  import tensorflow_datasets as tfds
  path = cfg.data.path
  if not path:
    raise ConfigError("data.path is empty; set --config.data.path to a tfds name or directory")
  try:
    if tf.io.gfile.isdir(path):
      return tfds.builder_from_directory(path)
    builder = tfds.builder(path)
  except Exception as e:  # tfds raises many types for unknown names / bad dirs
    raise ConfigError(
        f"data.path={path!r} is not a tfds dataset: {str(e).splitlines()[0]}") from None
  if not tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json")):
    raise ConfigError(f"tfds dataset {path!r} is not prepared in {builder.data_dir} (no download "
                      "here): build it first or set data.path to its directory")
  return builder


def _sources(cfg) -> list:
  """What the cache key depends on: files with size and mtime, or the tfds identity."""
  if cfg.data.source == "tfds":
    b = _tfds_builder(cfg)
    return [b.name, str(b.version), b.data_dir, cfg.data.split, cfg.data.text_key]
  out = [cfg.data.source, cfg.data.text_key if cfg.data.source == "tfrecord" else ""]
  for f in _glob(cfg.data.path):
    st = tf.io.gfile.stat(f)
    out.append([f, st.length, st.mtime_nsec])
  return out


def _read_lines(path: str) -> Iterator[str | None]:
  """Lines of one text file; None for a blank line (document end)."""
  any_text = False
  ds = tf.data.TextLineDataset(path).batch(_READ_BATCH).prefetch(1)
  for chunk in ds.as_numpy_iterator():
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
    b = _tfds_builder(cfg)
    if key not in b.info.features:
      raise ConfigError(f"tfds dataset {cfg.data.path!r} has no feature data.text_key={key!r}; "
                        f"features: {sorted(b.info.features.keys())}")
    datasets = [("tfds " + cfg.data.path, b.as_dataset(split=cfg.data.split).map(lambda e: e[key]))]
  else:
    spec = {key: tf.io.FixedLenFeature([], tf.string, default_value="")}
    parse = lambda r: tf.io.parse_single_example(r, spec)[key]  # noqa: E731
    datasets = [(f, tf.data.TFRecordDataset(f).map(parse)) for f in _glob(cfg.data.path)]
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
    for f in _glob(cfg.data.path):
      yield from _read_lines(f)
      yield None  # a file ends its last document
  elif cfg.data.source in ("tfrecord", "tfds"):
    yield from _read_records(cfg)
  else:
    raise ConfigError(f"data.source={cfg.data.source!r} must be one of {SOURCES}")


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


def _text_units(cfg) -> Iterator[str]:
  return (u for u in _units(cfg) if u is not None)


def _total_bytes(cfg) -> int | None:
  """Size of the corpus files (progress ETA); None for tfrecord / tfds."""
  if cfg.data.source != "files":
    return None
  try:
    return sum(tf.io.gfile.stat(f).length for f in _glob(cfg.data.path))
  except ConfigError:
    return None


# -------------------------------------------------------------------------------- packing


def _bos_eos(tok) -> tuple[int, int]:
  """Block delimiters: the tokenizer's bos / eos (RoBERTa <s> / </s>), else its cls / sep
  (BERT [CLS] / [SEP])."""
  bos = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
  eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
  if bos is None or eos is None:
    raise ConfigError(f"tokenizer {tok.name_or_path!r} has neither bos/eos nor cls/sep tokens "
                      "(<s> </s> or [CLS] [SEP]); blocks need both delimiters")
  return bos, eos


def special_ids(tok) -> dict:
  """The tokenizer's own special ids (what the export's config.json carries)."""
  bos, eos = _bos_eos(tok)
  return {"bos": bos, "eos": eos, "pad": tok.pad_token_id, "mask": tok.mask_token_id,
          "unk": tok.unk_token_id}


def token_stream(cfg, tok, progress: Progress | None = None) -> np.ndarray:
  """int32 stream of the corpus: tokens of each document followed by </s> (the eos)."""
  _, eos = _bos_eos(tok)
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
  limit = float(cfg.data.get("max_unk_frac", MAX_UNK_FRAC))
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


def _check_positions(cfg) -> None:
  need = cfg.data.block_size + cfg.model.pad_id + 1
  if need > cfg.model.max_positions:
    raise ConfigError(
        f"data.block_size={cfg.data.block_size} needs {need} positions but "
        f"model.max_positions={cfg.model.max_positions}, lower block_size or raise max_positions")


def _check_tokenizer(cfg, tok) -> None:
  if tok.pad_token_id is None:
    raise ConfigError(f"tokenizer {tok.name_or_path!r} has no pad token; add one (<pad> or "
                      "[PAD]) to it")
  if tok.pad_token_id != cfg.model.pad_id:
    raise ConfigError(f"tokenizer pad id {tok.pad_token_id} != model.pad_id={cfg.model.pad_id}; "
                      "drop --config.model.pad_id (it follows the tokenizer) or use the "
                      "tokenizer of the weights")
  if tok.mask_token_id is None:
    raise ConfigError(f"tokenizer {tok.name_or_path!r} has no mask token; add <mask> or [MASK]")


def resolve_model_keys(cfg, tok) -> None:
  """model.pad_id and model.vocab_size from the tokenizer, unless set on the command line or
  fixed by an init.hf directory (d2v_jax/init.py): then they must agree with it."""
  from d2v_jax import config as config_lib
  fixed = config_lib.explicit_keys(cfg)
  if "model.pad_id" not in fixed and tok.pad_token_id is not None:
    cfg.model.pad_id = int(tok.pad_token_id)
  _check_tokenizer(cfg, tok)
  n = len(tok)
  if "model.vocab_size" in fixed and cfg.model.vocab_size is not None:
    if cfg.model.vocab_size < n:
      raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
                        f"{n} ids of tokenizer {tok.name_or_path!r}; use the tokenizer of the "
                        "weights or drop --config.model.vocab_size")
  else:
    cfg.model.vocab_size = n
  _check_positions(cfg)


def _blocks(cfg, workdir: str, tok) -> str:
  """Path of the packed [N, block_size] int32 .npy; packs the corpus if it is not cached."""
  key = json.dumps([_CACHE_VERSION, _sources(cfg), _tokenizer_hash(tok), cfg.data.block_size])
  cache = cfg.data.cache_dir or os.path.join(_local_dir(workdir), "data_cache")
  path = os.path.join(cache, hashlib.sha256(key.encode()).hexdigest()[:20] + ".npy")
  if os.path.exists(path):
    stats = _read_stats(path)
    if stats:
      _check_unk(cfg, tok, stats["unk_frac"], stats["tokens"])
    return path
  progress = Progress("caching corpus", _total_bytes(cfg))
  stream = token_stream(cfg, tok, progress)
  frac = unk_fraction(stream, tok)
  _check_unk(cfg, tok, frac, len(stream))
  blocks = pack(stream, cfg.data.block_size, *_bos_eos(tok))
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


def _read_stats(path: str) -> dict | None:
  try:
    with open(path + ".json") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


# ------------------------------------------------------------------------ modality protocol


def prepare(cfg: ml_collections.ConfigDict, workdir: str) -> None:
  """Tokenizer (trained if none is given), model.vocab_size / pad_id from it, and the packed
  block cache (with its unknown-token guard)."""
  _check_positions(cfg)
  tok = resolve_tokenizer(cfg, workdir)
  resolve_model_keys(cfg, tok)
  _blocks(cfg, workdir, tok)


def resolve_offline(cfg: ml_collections.ConfigDict, workdir: str) -> None:
  """model.vocab_size / pad_id without reading the corpus (AOT compile, python -m
  d2v_jax.init): from data.tokenizer when one is given, else the size a trained tokenizer
  gets (data.vocab_size). Weights imported with init.hf need their own tokenizer."""
  del workdir
  if cfg.data.tokenizer:
    resolve_model_keys(cfg, load_tokenizer(cfg.data.tokenizer))
  elif cfg.init.hf:
    raise ConfigError(f"init.hf={cfg.init.hf!r} holds no tokenizer; set --config.data.tokenizer "
                      "to the tokenizer of these weights")
  elif cfg.model.vocab_size is None:
    cfg.model.vocab_size = int(cfg.data.vocab_size)


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Range checks of the text data keys."""
  d = cfg.data
  checks = [
      (d.source in SOURCES, f"data.source={d.source!r} must be one of {SOURCES}"),
      (d.block_size >= 8, f"data.block_size={d.block_size} must be >= 8"),
      (0.0 <= d.mask_prob <= 1.0, f"data.mask_prob={d.mask_prob} must be in [0, 1]"),
      (1 <= d.span <= d.block_size - 2,
       f"data.span={d.span} must be in [1, data.block_size - 2 = {d.block_size - 2}]"),
      (d.random_token_prob >= 0 and d.leave_unmasked_prob >= 0
       and d.random_token_prob + d.leave_unmasked_prob <= 1.0,
       f"data.random_token_prob={d.random_token_prob} + leave_unmasked_prob="
       f"{d.leave_unmasked_prob} must be in [0, 1]"),
      (bool(d.tokenizer) or d.vocab_size >= 261,
       f"data.vocab_size={d.vocab_size} must be >= 261 to train a byte-level BPE"),
  ]
  for ok, msg in checks:
    if not ok:
      raise ConfigError(msg)
  _check_positions(cfg)


def mask_spec(cfg, tok) -> MaskSpec:
  special = {tok.cls_token_id, tok.sep_token_id, tok.pad_token_id,
             tok.bos_token_id, tok.eos_token_id} - {None}
  random_ids = sorted(set(range(len(tok))) - set(tok.all_special_ids))
  return MaskSpec.from_config(cfg.data, tok.mask_token_id, sorted(special), random_ids)


def tf_dataset(cfg: ml_collections.ConfigDict, workdir: str, *, start_step: int,
               process_index: int, process_count: int) -> tf.data.Dataset:
  """The tf.data pipeline behind build_dataset (benchmarks set its threading options)."""
  b = order.per_process_batch(cfg.batch_size, process_count)
  _check_positions(cfg)
  tok = resolve_tokenizer(cfg, workdir)
  _check_tokenizer(cfg, tok)
  blocks = np.load(_blocks(cfg, workdir, tok), mmap_mode="r")
  spec = mask_spec(cfg, tok)
  ds = order.index_batches(len(blocks), cfg.batch_size, seed=cfg.seed, start_step=start_step,
                           process_index=process_index, process_count=process_count)
  t = blocks.shape[1]
  if blocks.nbytes <= _CONST_BYTES:
    table = tf.constant(np.asarray(blocks))
    rows = lambda idx: tf.gather(table, idx)  # noqa: E731
  else:
    def rows(idx):
      out = tf.numpy_function(lambda i: np.asarray(blocks[i]), [idx], tf.int32, stateful=False)
      return tf.ensure_shape(out, [b, t])

  def make(step, idx):
    source = rows(idx)
    seed = order.batch_seed(cfg.seed, step, process_index, _MASK_SALT)
    if cfg.get("objective", "v1") == "v2":
      return {"source": source, **masking_v2.random_batch(cfg, seed, b, t)}
    student, mask = mask_tokens(source, seed, spec)
    return {"source": source, "student": student, "mask": mask}

  ds = ds.map(make, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.prefetch(tf.data.AUTOTUNE)


def build_dataset(cfg: ml_collections.ConfigDict, workdir: str, *, start_step: int,
                  process_index: int, process_count: int) -> Iterator[dict]:
  """Infinite iterator of per-process batches {"source", "student": int32 [b, T], "mask": bool}."""
  return tf_dataset(cfg, workdir, start_step=start_step, process_index=process_index,
                    process_count=process_count).as_numpy_iterator()


def example_batch(cfg: ml_collections.ConfigDict, batch_size: int) -> dict:
  """Synthetic batch with the real shapes/dtypes (model init, AOT compile); no files."""
  t = cfg.data.block_size
  vocab = cfg.model.vocab_size or cfg.data.vocab_size
  rng = np.random.default_rng(0)
  source = rng.integers(len(SPECIAL_TOKENS), vocab - 1, (batch_size, t), dtype=np.int32)
  source[:, 0], source[:, -1] = 0, 2
  mask = np.zeros((batch_size, t), bool)
  mask[:, 1:-1:7] = True
  student = np.where(mask, vocab - 1, source).astype(np.int32)
  if cfg.get("objective", "v1") == "v2":
    v2 = masking_v2.random_batch(cfg, tf.constant([0, 0], tf.int64), batch_size, t)
    return {"source": source, **{k: v.numpy() for k, v in v2.items()}}
  return {"source": source, "student": student, "mask": mask}


# ------------------------------------------------------------------------------------ CLI


# ------------------------------------------------------------------ labelled probe sets


def run_tokenizer(cfg, workdir: str | None):
  """The run's tokenizer: data.tokenizer, else the one training wrote to WORKDIR/tokenizer."""
  path = cfg.data.tokenizer or (os.path.join(_local_dir(workdir), "tokenizer")
                                if workdir else "")
  if not path or not os.path.isdir(path):
    raise ConfigError(f"no tokenizer for the text probe: data.tokenizer is empty and {path!r} "
                      "does not exist; probe a run directory that trained (it writes "
                      "WORKDIR/tokenizer) or set data.tokenizer")
  return load_tokenizer(path)


def labelled_set(cfg, workdir: str | None, path: str) -> labelled.LabelledSet:
  """A `text<TAB>label` TSV, tokenized with the run's tokenizer (data.tokenizer or
  WORKDIR/tokenizer) as <s> text </s> (its bos / eos, or [CLS] / [SEP]), cut at
  data.block_size and padded with model.pad_id (python -m d2v_jax.probe)."""
  texts, names = labelled.read_tsv(path)
  tok = run_tokenizer(cfg, workdir)
  block = int(cfg.data.block_size)
  # as training packs: the tokenizer's bos + tokens + eos (its own padding / truncation off)
  bos, eos = special_ids(tok)["bos"], special_ids(tok)["eos"]
  enc = corpus_encoder(tok).encode_batch(texts, add_special_tokens=False)
  ids = [[bos] + e.ids[: block - 2] + [eos] for e in enc]
  # one length for the whole set (one compile), as short as the longest example allows
  t = min(block, 8 * math.ceil(max(len(x) for x in ids) / 8))
  out = np.full((len(ids), t), cfg.model.pad_id, np.int32)
  for i, x in enumerate(ids):
    out[i, :len(x)] = x
  labels, classes = labelled.label_ids(names)
  arrays = {"source": out, "student": out.copy(), "mask": np.zeros(out.shape, bool)}
  return labelled.LabelledSet(arrays, labels, classes, texts)


def _main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="python -m d2v_jax.data.text")
  sub = p.add_subparsers(dest="cmd", required=True)
  t = sub.add_parser("train-tokenizer", help="train a byte-level BPE on text files")
  t.add_argument("--input", required=True, help="glob of text files")
  t.add_argument("--out", required=True)
  t.add_argument("--vocab-size", type=int, default=50265)
  r = sub.add_parser("prepare", help="tokenize + pack a config's corpus into the cache")
  r.add_argument("--workdir", required=True)
  args, rest = p.parse_known_args(argv)
  try:
    t0 = time.time()
    if args.cmd == "train-tokenizer":
      if rest:
        p.error(f"unknown arguments {rest}")
      if os.path.exists(args.out):
        raise ConfigError(f"--out {args.out} exists; remove it or pick another directory")
      c = ml_collections.ConfigDict(dict(data=dict(source="files", path=args.input)))
      train_tokenizer(_text_units(c), args.vocab_size, args.out)
      n = len(load_tokenizer(args.out))
      print(f"tokenizer: {args.out} ({n} ids, {time.time() - t0:.1f} s)")
    else:
      from absl import flags
      from d2v_jax import config as config_lib
      cfg = config_lib.parse_argv([p.prog] + rest, flags.FlagValues()).config
      validate(cfg)
      prepare(cfg, args.workdir)
      path = _blocks(cfg, args.workdir, resolve_tokenizer(cfg, args.workdir))
      n = np.load(path, mmap_mode="r").shape
      print(f"blocks: {path} {list(n)} vocab_size={cfg.model.vocab_size} "
            f"({time.time() - t0:.1f} s)")
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(_main(sys.argv[1:]))
