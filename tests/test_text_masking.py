"""Text masking (fairseq MaskTokensDataset, span and BERT variants) on synthetic ids."""

import math

import numpy as np
import pytest
import tensorflow as tf

from d2v_jax.data import order
from d2v_jax.data.masking_text import MaskSpec, mask_tokens

BOS, PAD, EOS, UNK = 0, 1, 2, 3
VOCAB = 1000
MASK = VOCAB - 1
SPECIAL = (BOS, PAD, EOS)
RANDOM_IDS = tuple(range(4, MASK))


def spec(p, span, rand=0.0, keep=0.0):
  return MaskSpec(mask_id=MASK, special_ids=SPECIAL, random_ids=RANDOM_IDS, mask_prob=p,
                  span=span, random_token_prob=rand, leave_unmasked_prob=keep)


def full_rows(rows, t, seed=0):
  """<s> + t-2 random non-special tokens + </s>."""
  ids = np.random.default_rng(seed).integers(4, MASK, (rows, t), dtype=np.int32)
  ids[:, 0], ids[:, -1] = BOS, EOS
  return ids


def doc_rows(rows, t, seed=0):
  """Rows with documents split by </s> at random places and padding at the end."""
  rng = np.random.default_rng(seed)
  ids = full_rows(rows, t, seed)
  for r in range(rows):
    ids[r, rng.choice(np.arange(2, t - 2), 6, replace=False)] = EOS
    ids[r, t - rng.integers(0, 20):] = PAD
  return ids


def run(ids, sp, seed=(1, 2)):
  student, mask = mask_tokens(tf.constant(ids), tf.constant(seed, tf.int64), sp)
  return student.numpy(), mask.numpy()


def expected_fraction(n, p, span):
  """Exact E[masked / n] for n contiguous maskable tokens (independent of the TF code):
  k = floor(p n / span + U) starts uniform without replacement; a position i is covered
  unless none of the w_i starts in [i - span + 1, i] is chosen: P = C(n - w_i, k) / C(n, k)."""
  x = p * n / span
  lo = math.floor(x)
  total = 0.0
  for k, pk in ((lo, 1 - (x - lo)), (lo + 1, x - lo)):
    k = min(k, n)
    w = np.minimum(np.arange(n) + 1, span)
    covered = sum(1 - math.comb(n - wi, k) / math.comb(n, k) for wi in w)
    total += pk * covered / n
  return total


@pytest.mark.parametrize("p,span", [(0.35, 4), (0.15, 1)])
def test_mask_ratio_matches_fairseq_expectation(p, span):
  t = 128
  ids = full_rows(4096, t)
  _, mask = run(ids, spec(p, span))
  got = mask[:, 1:-1].mean()
  want = expected_fraction(t - 2, p, span)
  # 4096 rows x 126 tokens: the sampling std of the mean is ~6e-4; 5e-3 is > 8 sigma.
  assert abs(got - want) < 5e-3, (got, want)
  if span == 4:
    assert 0.30 < want < 0.31  # overlapping spans: well below the nominal 35 %
  else:
    assert want == pytest.approx(0.15, abs=1e-12)  # E[floor(x + U)] = x


def test_span_runs_and_specials():
  t = 96
  ids = doc_rows(512, t)
  student, mask = run(ids, spec(0.35, 4))
  special = np.isin(ids, SPECIAL)
  assert not (mask & special).any()
  np.testing.assert_array_equal(student[special], ids[special])
  np.testing.assert_array_equal(mask, student == MASK)
  short = 0
  for r in range(len(ids)):
    row = np.concatenate([[False], mask[r], [False]]).astype(np.int8)
    starts = np.flatnonzero(np.diff(row) == 1)
    ends = np.flatnonzero(np.diff(row) == -1)  # exclusive
    for s, e in zip(starts, ends):
      if e - s < 4:
        short += 1
        # a short run is cut by a special token or the end of the row
        assert e == t or special[r, e], (r, s, e)
  assert short > 0  # the layout does clip some spans, so the branch above is exercised


def test_bert_80_10_10():
  ids = full_rows(4096, 128)
  sp = spec(0.15, 1, rand=0.1, keep=0.1)
  student, mask = run(ids, sp, seed=(5, 6))
  # Selection does not depend on the replacement probabilities (separate random streams),
  # so the same seed with no random/unchanged gives the full selected set.
  _, selected = run(ids, spec(0.15, 1), seed=(5, 6))
  n_sel = selected.sum()
  assert n_sel / selected[:, 1:-1].size == pytest.approx(0.15, abs=3e-3)
  assert not (mask & ~selected).any()
  assert (student[~selected] == ids[~selected]).all()
  s, o = student[selected], ids[selected]
  frac_mask = (s == MASK).mean()
  frac_rand = ((s != MASK) & (s != o)).mean()
  frac_keep = (s == o).mean()  # includes random draws equal to the original (1/995 of 10 %)
  # ~77k selected tokens: std of each fraction <= 1.5e-3; tolerance 0.01.
  assert frac_mask == pytest.approx(0.8, abs=0.01)
  assert frac_rand == pytest.approx(0.1, abs=0.01)
  assert frac_keep == pytest.approx(0.1, abs=0.01)
  randoms = s[(s != MASK) & (s != o)]
  assert randoms.min() >= 4 and randoms.max() < MASK  # never a special token
  np.testing.assert_array_equal(mask, student == MASK)  # loss only on <mask>


def test_hand_cases():
  ids = np.array([[BOS, 10, 11, 12, EOS, 13, 14, PAD]], np.int32)
  student, mask = run(ids, spec(1.0, 1))  # k = floor(n + U) = n: every maskable token
  np.testing.assert_array_equal(mask[0], [0, 1, 1, 1, 0, 1, 1, 0])
  np.testing.assert_array_equal(student[0], [BOS, MASK, MASK, MASK, EOS, MASK, MASK, PAD])
  student, mask = run(ids, spec(0.0, 4))  # k = floor(U) = 0
  assert not mask.any() and (student == ids).all()
  # p n / span = 1 * 2 / 2 -> exactly one start among {1, 2}; a span of 2 from 2 stops at </s>.
  ids = np.array([[BOS, 10, 11, EOS]], np.int32)
  seen = set()
  for seed in range(20):
    _, mask = run(ids, spec(1.0, 2), seed=(seed, 0))
    seen.add(tuple(mask[0].astype(int)))
  assert seen == {(0, 1, 1, 0), (0, 0, 1, 0)}


def test_determinism_and_tf_data_equality():
  ids = doc_rows(32, 64)
  sp = spec(0.15, 1, rand=0.1, keep=0.1)
  a = run(ids, sp, seed=(3, 4))
  b = run(ids, sp, seed=(3, 4))
  c = run(ids, sp, seed=(3, 5))
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert (a[1] != c[1]).any()
  ds = tf.data.Dataset.from_tensors((tf.constant(ids), tf.constant([3, 4], tf.int64)))
  ds = ds.map(lambda x, s: mask_tokens(x, s, sp), num_parallel_calls=2)
  student, mask = next(ds.as_numpy_iterator())
  np.testing.assert_array_equal(student, a[0])
  np.testing.assert_array_equal(mask, a[1])


def test_batch_seed_depends_on_step_and_process():
  seeds = {tuple(order.batch_seed(0, s, p, 7).numpy()) for s in range(4) for p in range(3)}
  assert len(seeds) == 12
  np.testing.assert_array_equal(order.batch_seed(0, 2, 1, 7), order.batch_seed(0, 2, 1, 7))
