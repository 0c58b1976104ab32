"""Text input pipeline: tokenizer, packing, order/resume, sharding over processes, errors."""

import os

import numpy as np
import pytest
import tensorflow as tf

from d2v_jax.config import ConfigError, load_file
from d2v_jax.data import text_corpus, text_tokenizer
from d2v_jax.data import order, text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(**data):
  cfg = load_file(os.path.join(ROOT, "configs/text.py") + ":variant=tiny,runlocal")
  cfg.data.update(data)
  return cfg


@pytest.fixture(scope="module")
def kjv(kjv_path, tmp_path_factory):
  """KJV prepared once: (cfg, workdir) with a trained 4096-id tokenizer and 128-token blocks."""
  workdir = str(tmp_path_factory.mktemp("kjv"))
  cfg = config(path=kjv_path)
  text.validate(cfg)
  text.prepare(cfg, workdir)
  return cfg, workdir


def batches(cfg, workdir, n, **kw):
  it = text.build_dataset(cfg, workdir, **kw)
  return [next(it) for _ in range(n)]


def test_tokenizer_is_autotokenizer_loadable_and_deterministic(kjv, kjv_path, tmp_path):
  from transformers import AutoTokenizer
  cfg, workdir = kjv
  tok = AutoTokenizer.from_pretrained(os.path.join(workdir, "tokenizer"))
  assert [tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
  assert tok.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3]
  assert len(tok) == 4096 and tok.mask_token_id == 4095
  assert cfg.model.vocab_size == 4096
  ids = tok("In the beginning God created the heaven")["input_ids"]
  assert ids[0] == 0 and ids[-1] == 2 and len(ids) < 12  # merges learned: words, not bytes
  assert tok.decode(ids, skip_special_tokens=True) == "In the beginning God created the heaven"
  # Same corpus -> byte-identical tokenizer.
  text_tokenizer.train_tokenizer(text_corpus.text_units(cfg), 4096, str(tmp_path / "again"))
  for name in ("tokenizer.json", "vocab.json", "merges.txt"):
    with open(os.path.join(workdir, "tokenizer", name), "rb") as a:
      assert a.read() == (tmp_path / "again" / name).read_bytes(), name


def test_packing(kjv, kjv_path):
  cfg, workdir = kjv
  tok = text.resolve_tokenizer(cfg, workdir)
  stream = text_corpus.token_stream(cfg, tok)
  # One </s> per document: groups of non-blank lines separated by blank lines.
  with open(kjv_path) as f:
    lines = [line.strip() for line in f]
  docs = sum(1 for i, line in enumerate(lines)
             if line and (i + 1 == len(lines) or not lines[i + 1]))
  assert (stream == 2).sum() == docs
  assert not np.isin(stream, [0, 1, 4095]).any()
  blocks = np.load(text_corpus.blocks(cfg, workdir, tok))
  assert blocks.dtype == np.int32 and blocks.shape == (len(stream) // 126, 128)
  assert (blocks[:, 0] == 0).all() and (blocks[:, -1] == 2).all()
  np.testing.assert_array_equal(blocks[:, 1:-1].ravel(), stream[: blocks.shape[0] * 126])
  first = tok.decode(blocks[0, 1:-1])
  assert first.startswith("Genesis 1")
  assert "upon the face of the deep." in first  # a wrapped line joins its paragraph with a space


def test_batches_shapes_and_masks(kjv):
  cfg, workdir = kjv
  (b,) = batches(cfg, workdir, 1, start_step=0, process_index=0, process_count=1)
  assert set(b) == {"source", "student", "mask"}
  assert b["source"].shape == b["student"].shape == b["mask"].shape == (16, 128)
  assert b["source"].dtype == b["student"].dtype == np.int32 and b["mask"].dtype == bool
  np.testing.assert_array_equal(b["mask"], b["student"] == 4095)
  keep = ~b["mask"]
  np.testing.assert_array_equal(b["student"][keep], b["source"][keep])  # span: no random
  assert 0.25 < b["mask"][:, 1:-1].mean() < 0.36


def test_resume_equals_skip(kjv):
  cfg, workdir = kjv
  from_zero = batches(cfg, workdir, 5, start_step=0, process_index=0, process_count=1)
  resumed = batches(cfg, workdir, 2, start_step=3, process_index=0, process_count=1)
  for a, b in zip(from_zero[3:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert (from_zero[3]["source"] != from_zero[4]["source"]).any()


def test_memmap_path_equals_constant_path(kjv, monkeypatch):
  cfg, workdir = kjv
  a = batches(cfg, workdir, 2, start_step=7, process_index=0, process_count=1)
  monkeypatch.setattr(text, "_CONST_BYTES", 0)
  b = batches(cfg, workdir, 2, start_step=7, process_index=0, process_count=1)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_two_processes_split_the_global_batch(kjv):
  cfg, workdir = kjv
  one = batches(cfg, workdir, 2, start_step=5, process_index=0, process_count=1)
  p0 = batches(cfg, workdir, 2, start_step=5, process_index=0, process_count=2)
  p1 = batches(cfg, workdir, 2, start_step=5, process_index=1, process_count=2)
  for g, a, b in zip(one, p0, p1):
    assert a["source"].shape == (8, 128)
    np.testing.assert_array_equal(np.concatenate([a["source"], b["source"]]), g["source"])
  n = 8462  # the KJV block count above; any N works
  for step in (0, 5, 528, 529, 10_000):
    i0 = order.example_indices(step, num_examples=n, global_batch=16, seed=0, process_index=0,
                               process_count=2).numpy()
    i1 = order.example_indices(step, num_examples=n, global_batch=16, seed=0, process_index=1,
                               process_count=2).numpy()
    full = order.example_indices(step, num_examples=n, global_batch=16, seed=0, process_index=0,
                                 process_count=1).numpy()
    assert not set(i0) & set(i1)
    np.testing.assert_array_equal(np.concatenate([i0, i1]), full)


def test_order_is_a_permutation_per_epoch():
  n, gb = 100, 10
  epochs = [np.concatenate([order.example_indices(s, num_examples=n, global_batch=gb, seed=3,
                                                  process_index=0, process_count=1).numpy()
                            for s in range(e * 10, e * 10 + 10)]) for e in range(2)]
  for e in epochs:
    np.testing.assert_array_equal(np.sort(e), np.arange(n))
  assert (epochs[0] != epochs[1]).any()  # a fresh permutation every epoch
  ds = order.index_batches(n, gb, seed=3, start_step=10, process_index=0, process_count=1)
  step, idx = next(ds.as_numpy_iterator())
  assert step == 10
  np.testing.assert_array_equal(idx, epochs[1][:10])


def test_tfrecord_source_matches_files(tmp_path, kjv):
  cfg, workdir = kjv
  docs = ["In the beginning God created the heaven and the earth.",
          "And the earth was without form, and void.",
          "And God said, Let there be light: and there was light."] * 40
  (tmp_path / "a.txt").write_text("\n\n".join(docs) + "\n")
  with tf.io.TFRecordWriter(str(tmp_path / "a.tfrecord")) as w:
    for d in docs:
      ex = tf.train.Example(features=tf.train.Features(feature={
          "text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[d.encode()]))}))
      w.write(ex.SerializeToString())
  tok = text.resolve_tokenizer(cfg, workdir)
  a = text_corpus.token_stream(config(source="files", path=str(tmp_path / "a.txt")), tok)
  b = text_corpus.token_stream(config(source="tfrecord", path=str(tmp_path / "*.tfrecord")), tok)
  np.testing.assert_array_equal(a, b)
  assert (a == 2).sum() == len(docs)


def test_errors(tmp_path, kjv):
  cfg, workdir = kjv
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  blank = tmp_path / "blank.txt"
  blank.write_text("  \n\n\t\n")
  tokdir = os.path.join(workdir, "tokenizer")
  for f in (empty, blank):
    with pytest.raises(ConfigError, match=f"text file {f} is empty"):
      text.prepare(config(path=str(f), tokenizer=tokdir), str(tmp_path / "w"))
  with pytest.raises(ConfigError, match="matches no text file"):
    text.prepare(config(path=str(tmp_path / "nothing*.txt")), str(tmp_path / "w"))
  small = tmp_path / "small.txt"
  small.write_text("In the beginning\n")
  with pytest.raises(ConfigError, match="fewer than one block"):
    text.prepare(config(path=str(small), tokenizer=tokdir), str(tmp_path / "w"))
  long_cfg = config(path=str(small), block_size=600)
  with pytest.raises(ConfigError, match=r"data.block_size=600 needs 602 positions but "
                                        r"model.max_positions=514"):
    text.validate(long_cfg)
  with pytest.raises(ConfigError, match="needs 602 positions"):
    text.prepare(long_cfg, str(tmp_path / "w"))
  odd = config(path=cfg.data.path)
  odd.batch_size = 10
  with pytest.raises(ConfigError, match="batch_size=10 is not divisible by process_count=4"):
    text.build_dataset(odd, workdir, start_step=0, process_index=0, process_count=4)
  for key, value, msg in [("mask_prob", 1.5, "data.mask_prob=1.5"), ("span", 0, "data.span=0"),
                          ("block_size", 4, "data.block_size=4"),
                          ("random_token_prob", 0.6, "random_token_prob=0.6"),
                          ("source", "csv", "data.source='csv'")]:
    bad = config(path="x", **({"leave_unmasked_prob": 0.5} if key == "random_token_prob" else {}))
    bad.data[key] = value
    with pytest.raises(ConfigError, match=msg):
      text.validate(bad)


def test_example_batch():
  cfg = config()
  cfg.model.vocab_size = 4096
  b = text.example_batch(cfg, 4)
  assert b["source"].shape == b["student"].shape == b["mask"].shape == (4, 128)
  assert b["source"].dtype == np.int32 and b["mask"].dtype == bool
  assert (b["source"][:, 0] == 0).all() and (b["source"][:, -1] == 2).all()
  np.testing.assert_array_equal(b["mask"], b["student"] == 4095)
  assert b["source"].max() < 4095 and b["mask"].sum() == 4 * 18


# ------------------------------------------------------------- bring your own tokenizer


def _docs(path: str) -> list[list[str]]:
  """Documents of a text file as the files source reads them: stripped non-blank lines,
  blank lines end a document."""
  docs, cur = [], []
  for line in open(path, encoding="utf-8"):
    line = line.strip()
    if line:
      cur.append(line)
    elif cur:
      docs.append(cur)
      cur = []
  return docs + ([cur] if cur else [])


@pytest.fixture(scope="module")
def bert_dir(kjv_path, tmp_path_factory):
  """A BERT-style WordPiece tokenizer trained on KJV with padding to 128 and truncation at 128
  switched on in its tokenizer.json (as published tokenizers often are)."""
  from byo_utils import bert_tokenizer
  path = str(tmp_path_factory.mktemp("bert") / "tok")
  with open(kjv_path) as f:
    lines = [next(f) for _ in range(20_000)]
  tok = bert_tokenizer(lines, path, vocab_size=2000, pad_to=128)
  assert tok.backend_tokenizer.padding["length"] == 128
  assert tok.backend_tokenizer.truncation["max_length"] == 128
  return path


def test_given_tokenizer_is_used_without_its_padding_and_truncation(bert_dir, kjv_path, tmp_path,
                                                                    capsys):
  """The cached corpus holds exactly the ids of encoding each line alone (no [PAD] runs, no
  truncation of a 300-token line), [CLS]/[SEP] delimit blocks, model.pad_id follows the
  tokenizer ([PAD]=0), masks use [MASK]=4; the whole KJV has < 1 % [UNK]."""
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(bert_dir)
  with open(kjv_path) as f:
    head = [next(f) for _ in range(3000)]
  long_line = " ".join(line.strip() for line in head[3:80] if line.strip())
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("".join(head) + "\n" + long_line + "\n")
  cfg = config(path=str(corpus), tokenizer=bert_dir)
  assert cfg.model.pad_id == 1            # the RoBERTa default: resolved from the tokenizer
  text.validate(cfg)
  text.prepare(cfg, str(tmp_path / "w"))
  assert (cfg.model.pad_id, cfg.model.vocab_size) == (0, len(tok)) and len(tok) == 2000
  assert text.special_ids(tok) == {"bos": 2, "eos": 3, "pad": 0, "mask": 4, "unk": 1}

  encode = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731  one line alone
  assert len(encode(long_line)) > 300    # would be cut at 128 by the tokenizer's truncation
  want = []
  for doc in _docs(str(corpus)):
    for line in doc:
      want += encode(line)
    want.append(3)                       # [SEP] ends a document
  want = np.asarray(want, np.int32)
  tok_loaded = text.resolve_tokenizer(cfg, str(tmp_path / "w"))
  np.testing.assert_array_equal(text_corpus.token_stream(cfg, tok_loaded), want)
  blocks = np.load(text_corpus.blocks(cfg, str(tmp_path / "w"), tok_loaded))
  assert blocks.shape == (len(want) // 126, 128)
  np.testing.assert_array_equal(blocks[:, 1:-1].ravel(), want[: blocks.shape[0] * 126])
  assert (blocks[:, 0] == 2).all() and (blocks[:, -1] == 3).all()
  assert not (blocks == 0).any() and (blocks == 1).mean() < 0.01   # no [PAD]; [UNK] rare
  (b,) = batches(cfg, str(tmp_path / "w"), 1, start_step=0, process_index=0, process_count=1)
  np.testing.assert_array_equal(b["mask"], b["student"] == 4)
  assert 0.25 < b["mask"][:, 1:-1].mean() < 0.36

  full = config(path=kjv_path, tokenizer=bert_dir)
  text.prepare(full, str(tmp_path / "w"))
  stats = text_corpus.read_stats(text_corpus.blocks(full, str(tmp_path / "w"), tok_loaded))
  assert stats["tokens"] > 1_000_000 and stats["unk_frac"] < 0.01, stats
  assert "% unknown tokens" in capsys.readouterr().out


def test_wrong_tokenizer_trips_the_unknown_token_guard(kjv_path, tmp_path):
  """A WordPiece that only knows the letters a-e maps nearly every KJV word to [UNK]: prepare
  stops with one line naming the share and data.max_unk_frac, and caches nothing."""
  from byo_utils import bert_tokenizer
  bert_tokenizer(["a b c d e ab cd de bad"] * 10, str(tmp_path / "tiny"), vocab_size=30)
  with open(kjv_path) as f:
    (tmp_path / "c.txt").write_text("".join(next(f) for _ in range(2000)))
  cfg = config(path=str(tmp_path / "c.txt"), tokenizer=str(tmp_path / "tiny"),
               cache_dir=str(tmp_path / "cache"))
  with pytest.raises(ConfigError) as e:
    text.prepare(cfg, str(tmp_path / "w"))
  msg = str(e.value)
  assert "\n" not in msg and "data.max_unk_frac=0.05" in msg, msg
  frac = float(msg.split("turns ")[1].split("%")[0])
  assert frac > 90.0, msg
  assert not os.path.exists(tmp_path / "cache") or not os.listdir(tmp_path / "cache")
  cfg.data.max_unk_frac = 1.0            # the limit is a config value
  text.prepare(cfg, str(tmp_path / "w"))
  assert len(os.listdir(tmp_path / "cache")) == 2   # blocks + stats


def test_progress_lines(kjv, monkeypatch, capsys, tmp_path):
  """Caching prints progress lines with counts, share done and ETA when it takes long."""
  cfg, workdir = kjv
  monkeypatch.setattr(text_corpus, "PROGRESS_AFTER", 0.0)
  monkeypatch.setattr(text_corpus, "PROGRESS_EVERY", 0.0)
  small = tmp_path / "s.txt"
  with open(cfg.data.path) as f:
    small.write_text("".join(next(f) for _ in range(9000)))
  c = config(path=str(small), tokenizer=os.path.join(workdir, "tokenizer"))
  text.prepare(c, str(tmp_path / "w"))
  lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("caching corpus:")]
  assert len(lines) >= 2                 # one per 4096-line chunk
  import re
  assert re.match(r"caching corpus: [\d,]+ lines, [\d,]+ tokens, [\d.]+ MiB \([\d.]+ MiB/s\) "
                  r"\| \d+% of [\d.]+ MiB \| ETA \d:\d\d:\d\d$", lines[0]), lines[0]
  assert lines[-1].split(" | ")[1].startswith("100% of ")


def test_tokenizer_training_progress_lines(monkeypatch, capsys, tmp_path, kjv_path):
  """Training a tokenizer prints lines for reading (counts, ETA) and, while the merges are
  computed inside `tokenizers`, a periodic elapsed-time line, then a done line."""
  monkeypatch.setattr(text_corpus, "PROGRESS_AFTER", 0.0)
  monkeypatch.setattr(text_corpus, "PROGRESS_EVERY", 0.02)
  small = tmp_path / "s.txt"
  with open(kjv_path) as f:
    small.write_text("".join(next(f) for _ in range(20000)))
  text.resolve_tokenizer(config(path=str(small), vocab_size=8192), str(tmp_path / "w"))
  lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("training tokenizer")]
  import re
  kinds = ["read" if ": read" in x else "merges" if "computing merges (" in x else
           "done" if ": done in" in x else "?" for x in lines]
  assert "?" not in kinds, lines
  assert kinds[-1] == "done" and kinds.count("done") == 1, kinds
  first_merge = kinds.index("merges")      # the merge heartbeat starts after reading ends
  assert "read" in kinds[:first_merge] and "read" not in kinds[first_merge:], kinds
  assert re.match(r"training tokenizer \(vocab 8192\): read: [\d,]+ lines", lines[0]), lines[0]
  assert re.match(r"training tokenizer: computing merges \(vocab 8192\), \d+ s so far$",
                  lines[first_merge]), lines[first_merge]
