"""Text input for data2vec-text: tokenizer, corpus packing, ordered batches with masks.

  python -m d2v_jax.data train-tokenizer --input 'data/text/*.txt' --out tok --vocab-size 8192
  python -m d2v_jax.data prepare --config configs/text.py:variant=tiny,runlocal --workdir runs/x

Corpus (d2v_jax/data/sources.py, read in d2v_jax/data/text_corpus.py): "files" (globs /
directories of plain text; a line is a text unit, a blank line ends a document), "tfrecord"
(tf.train.Example records with a bytes feature cfg.data.text_key; a record is a document)
or "tfds" (a tfds name or a prepared tfds directory, split cfg.data.split, never
downloaded). Packed RoBERTa FULL-SENTENCES into cached blocks (text_corpus.py).

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

import math
import os
from typing import Iterator

import ml_collections
import numpy as np
import tensorflow as tf

from d2v_jax import config as config_lib
from d2v_jax.config import ConfigError
from d2v_jax.data import labelled, masking_v2, order, sources, text_corpus
from d2v_jax.data.masking_text import MaskSpec, mask_tokens
from d2v_jax.data.text_corpus import blocks, resolve_tokenizer
from d2v_jax.data.text_tokenizer import SPECIAL_TOKENS, corpus_encoder, load_tokenizer, special_ids

_MASK_SALT = 0x7E47     # separates the mask stream from the order stream (same cfg.seed)
_CONST_BYTES = 256 << 20  # blocks up to this size live in a tf constant; above: memmap
# Data keys added after runs were written (config.fill_defaults, d2v_jax/resolve.py).
LATE_DEFAULTS = {"data.max_unk_frac": text_corpus.MAX_UNK_FRAC, "data.tfds_data_dir": "",
                 "data.threads": 0}


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
  fixed by an init.hf directory (d2v_jax/init_weights.py): then they must agree with it."""
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


NEEDS_VOCAB = ("init.fairseq={!r} is a text model: its ids are fairseq's dictionary; set "
               "--config.data.tokenizer to its tokenizer (from fairseq's dict.txt + encoder.json + "
               "vocab.bpe: python -m d2v_jax.data fairseq-vocab, or init --vocab DIR)")


def prepare(cfg: ml_collections.ConfigDict, workdir: str) -> None:
  """Tokenizer (trained if none is given), model.vocab_size / pad_id from it, and the packed
  block cache (with its unknown-token guard)."""
  _check_positions(cfg)
  if cfg.init.fairseq and not cfg.data.tokenizer:   # a trained BPE would not be its vocabulary
    raise ConfigError(NEEDS_VOCAB.format(cfg.init.fairseq))
  tok = resolve_tokenizer(cfg, workdir)
  resolve_model_keys(cfg, tok)
  blocks(cfg, workdir, tok)


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
  elif cfg.init.fairseq:
    raise ConfigError(NEEDS_VOCAB.format(cfg.init.fairseq))
  elif cfg.model.vocab_size is None:
    cfg.model.vocab_size = int(cfg.data.vocab_size)


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Range checks of the text data keys."""
  d = cfg.data
  checks = [
      *sources.checks(cfg, need_path=False),
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
  table_rows = np.load(blocks(cfg, workdir, tok), mmap_mode="r")
  spec = mask_spec(cfg, tok)
  ds = order.index_batches(len(table_rows), cfg.batch_size, seed=cfg.seed, start_step=start_step,
                           process_index=process_index, process_count=process_count)
  t = table_rows.shape[1]
  if table_rows.nbytes <= _CONST_BYTES:
    table = tf.constant(np.asarray(table_rows))
    rows = lambda idx: tf.gather(table, idx)  # noqa: E731
  else:
    def rows(idx):
      out = tf.numpy_function(lambda i: np.asarray(table_rows[i]), [idx], tf.int32, stateful=False)
      return tf.ensure_shape(out, [b, t])

  def make(step, idx):
    source = rows(idx)
    seed = order.batch_seed(cfg.seed, step, process_index, _MASK_SALT)
    if cfg.objective == "v2":
      return {"source": source, **masking_v2.random_batch(cfg, seed, b, t)}
    student, mask = mask_tokens(source, seed, spec)
    return {"source": source, "student": student, "mask": mask}

  ds = ds.map(make, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(sources.options(cfg))


def build_dataset(cfg: ml_collections.ConfigDict, workdir: str, *, start_step: int,
                  process_index: int, process_count: int) -> Iterator[dict]:
  """Infinite iterator of per-process batches {"source", "student": int32 [b, T], "mask": bool}."""
  return tf_dataset(cfg, workdir, start_step=start_step, process_index=process_index,
                    process_count=process_count).as_numpy_iterator()


def random_ids(rng: np.random.Generator, batch_size: int, length: int, vocab: int) -> np.ndarray:
  """int32 [batch_size, length] ids drawn between the special tokens and <mask> (the last id),
  each row framed <s> ... </s>: the content of every made-up text batch (example_batch,
  synthetic_batch, the GPU benchmark's; numpy only, so the latter runs without TensorFlow)."""
  ids = rng.integers(len(SPECIAL_TOKENS), vocab - 1, (batch_size, length), dtype=np.int32)
  ids[:, 0], ids[:, -1] = 0, 2
  return ids


def example_batch(cfg: ml_collections.ConfigDict, batch_size: int) -> dict:
  """Synthetic batch with the real shapes/dtypes (model init, AOT compile); no files."""
  t = cfg.data.block_size
  vocab = cfg.model.vocab_size or cfg.data.vocab_size
  source = random_ids(np.random.default_rng(0), batch_size, t, vocab)
  mask = np.zeros((batch_size, t), bool)
  mask[:, 1:-1:7] = True
  student = np.where(mask, vocab - 1, source).astype(np.int32)
  if cfg.objective == "v2":
    v2 = masking_v2.random_batch(cfg, tf.constant([0, 0], tf.int64), batch_size, t)
    return {"source": source, **{k: v.numpy() for k, v in v2.items()}}
  return {"source": source, "student": student, "mask": mask}


def synthetic_batch(cfg: ml_collections.ConfigDict, batch_size: int, seed: int = 0) -> dict:
  """Random ids with the real masks (span / BERT, or data2vec 2.0's), no files: the benchmark
  problem of the modality (d2v_jax/bench/setups.py)."""
  v, t = int(cfg.model.vocab_size), int(cfg.data.block_size)
  source = random_ids(np.random.default_rng(seed), batch_size, t, v)
  tf_seed = tf.constant([seed, 1], tf.int64)
  if cfg.objective == "v2":
    return {"source": source, **{k: x.numpy() for k, x in masking_v2.random_batch(
        cfg, tf_seed, batch_size, t).items()}}
  spec = MaskSpec.from_config(cfg.data, v - 1, (0, 1, 2, 3), range(len(SPECIAL_TOKENS), v - 1))
  student, mask = mask_tokens(tf.constant(source), tf_seed, spec)
  return {"source": source, "student": student.numpy(), "mask": mask.numpy()}


def run_tokenizer(cfg, workdir: str | None):
  """The run's tokenizer: data.tokenizer, else the one training wrote to WORKDIR/tokenizer."""
  path = cfg.data.tokenizer or (os.path.join(sources.local_dir(workdir), "tokenizer")
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
