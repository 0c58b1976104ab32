"""Audio masks (d2v_jax/data/masking_audio.py): v1 span masks with an exact count per row,
v2 block masks; and the instance-norm targets on padding."""

from __future__ import annotations

import types

import numpy as np
import pytest
import tensorflow as tf

from d2v_jax.data.masking_audio import (block_mask_1d, conv_output_length, expected_masked,
                                        span_mask, target_counts)

KERNELS = (10, 3, 3, 3, 3, 2, 2)
STRIDES = (5, 2, 2, 2, 2, 2, 2)
P, SPAN = 0.65, 10


def _runs(row: np.ndarray) -> list[int]:
  padded = np.concatenate([[0], row.astype(np.int8), [0]])
  d = np.diff(padded)
  return list(np.flatnonzero(d == -1) - np.flatnonzero(d == 1))


def _random_batches(n: int):
  rng = np.random.default_rng(0)
  for trial in range(n):
    t = int(rng.integers(12, 260))
    b = int(rng.integers(1, 9))
    lengths = rng.integers(1, t + 1, b)
    lengths[0] = t  # at least one full row, like a real batch
    yield trial, t, lengths


def test_conv_lengths_match_hf_for_odd_lengths():
  torch = pytest.importorskip("torch")
  from transformers import Data2VecAudioConfig, Data2VecAudioModel
  hf_self = types.SimpleNamespace(config=Data2VecAudioConfig())  # only .config is read
  lengths = np.array([401, 559, 1001, 3999, 16001, 16383, 32001, 48001, 123457, 250001, 319999])
  assert (lengths % 2 == 1).all()
  want = Data2VecAudioModel._get_feat_extract_output_lengths(hf_self, torch.tensor(lengths)).numpy()
  np.testing.assert_array_equal(conv_output_length(lengths, KERNELS, STRIDES), want)
  np.testing.assert_array_equal(conv_output_length(tf.constant(lengths), KERNELS, STRIDES).numpy(), want)
  assert [conv_output_length(int(n), KERNELS, STRIDES) for n in lengths] == want.tolist()
  assert conv_output_length(16000, KERNELS, STRIDES) == 49          # 20 ms frames, 25 ms window
  assert conv_output_length(399, KERNELS, STRIDES) == 0              # shorter than the receptive field


def test_exact_count_per_row_and_padding():
  """Every row ends with exactly target_counts[n] masked frames for its own valid length n
  (rows of equal length: equal counts), all inside the valid length."""
  want = target_counts(260, P, SPAN)
  for trial, t, lengths in _random_batches(60):
    lengths[-1] = lengths[0]  # two rows of equal length in every batch
    m = span_mask(tf.constant([trial, 3]), tf.constant(lengths), t, mask_prob=P, span=SPAN).numpy()
    np.testing.assert_array_equal(m.sum(1), want[lengths], err_msg=str((trial, lengths)))
    assert m.sum(1)[0] == m.sum(1)[-1]
    for i, n in enumerate(lengths):
      assert not m[i, n:].any(), (trial, i)                               # padding never masked
      assert m[i].sum() >= min(SPAN, n)                                   # min_spans=1


def test_expected_count_matches_hf_reference():
  """expected_masked (exact, used for the per-row count) against transformers'
  _compute_mask_indices (numpy RNG, one row per call so every row draws its own rounding):
  the mean masked fraction agrees within 0.005 (~3 standard errors at 3000 rows)."""
  from transformers.models.data2vec.modeling_data2vec_audio import _compute_mask_indices
  e = expected_masked(250, P, SPAN)
  np.random.seed(0)
  for n in (20, 99, 250):
    ref = np.mean([_compute_mask_indices((1, n), P, SPAN, min_masks=1).mean() for _ in range(3000)])
    print(f"n={n}: expected fraction {e[n] / n:.4f}, HF {ref:.4f}")
    assert abs(e[n] / n - ref) < 0.005
    assert abs(target_counts(250, P, SPAN)[n] - e[n]) <= 0.5
  assert 0.48 < e[250] / 250 < 0.50  # 1 - overlap losses from p=0.65 x span 10 (paper: ~49 %)
  assert e[5] == 5 and e[10] == 10   # a row no longer than one span is masked entirely


def test_mixed_lengths_keep_their_own_fraction():
  """A 2 s row (99 frames) next to a 16 s row (799 frames): each keeps its own ~49 % (the old
  batch-minimum rule left the 16 s row 49 of 799 = 6 %, all in its first frames), spread over
  the whole valid length, in spans (mean run length near the span)."""
  t, rows = 799, 400
  lengths = np.array([99, 799] * rows)
  m = span_mask(tf.constant([5, 1]), tf.constant(lengths), t, mask_prob=P, span=SPAN).numpy()
  e = expected_masked(t, P, SPAN)
  frac = m.sum(1) / lengths
  for n in (99, 799):
    f = frac[lengths == n]
    assert np.all(np.abs(f - e[n] / n) <= 0.5 / n), (n, np.unique(f))   # exact: round(E) / n
    print(f"{n} frames: masked fraction {f[0]:.4f} (expected {e[n] / n:.4f})")
  assert 0.49 < frac[1] < 0.50 and 0.49 < frac[0] < 0.50
  assert not m[lengths == 99, 99:].any()
  long = m[lengths == 799]
  second_half = long[:, 400:].sum() / long.sum()
  print(f"16 s rows: share of masked frames in the second half {second_half:.4f}")
  assert abs(second_half - 399 / 799) < 0.02
  runs = np.concatenate([_runs(r) for r in long])
  print(f"mean run length {runs.mean():.2f}, runs >= span {np.mean(runs >= SPAN):.2f}")
  assert runs.mean() > 8 and np.mean(runs >= SPAN) > 0.5


def _one_position_per_row(m: np.ndarray, lengths: np.ndarray, bins: int, seed: int):
  """Relative bin of ONE uniformly chosen masked frame per row (rows are independent, frames
  of one span are not: counting every frame would inflate the chi-square), and the expected
  bin shares under uniformity (bins hold unequal frame counts when n % bins != 0)."""
  rng = np.random.default_rng(seed)
  obs, exp = np.zeros(bins), np.zeros(bins)
  for row, n in zip(m, lengths):
    f = rng.choice(np.flatnonzero(row))
    obs[f * bins // n] += 1
    exp += np.bincount(np.arange(n) * bins // n, minlength=bins) / n
  return obs, exp


def test_masked_positions_uniform_chi_square():
  """Masked positions are uniform over each row's valid length, edges included (the wrap):
  chi-square over 10 relative-position bins, one masked frame per row, 4000 rows of 2 s and
  16 s, must not reject at p = 0.001. The same statistic on the old behaviour (each 16 s row
  keeps only its first 49 masked frames) rejects with p < 1e-12, so the test has power."""
  from scipy import stats
  t, rows, bins = 799, 2000, 10
  lengths = np.array([99, 799] * rows)
  m = span_mask(tf.constant([7, 2]), tf.constant(lengths), t, mask_prob=P, span=SPAN).numpy()
  obs, exp = _one_position_per_row(m, lengths, bins, seed=0)
  chi2, p = stats.chisquare(obs, exp * obs.sum() / exp.sum())
  print(f"chi-square {chi2:.2f} (df {bins - 1}), p = {p:.3f}; bins {obs.astype(int).tolist()}")
  assert p > 0.001
  # edge frames: the first and last frame of 16 s rows are masked like the middle ones (~0.49)
  long = m[lengths == 799]
  assert 0.44 < long[:, 0].mean() < 0.54 and 0.44 < long[:, 798].mean() < 0.54
  old = long & (np.cumsum(long, axis=1) <= 49)
  obs, exp = _one_position_per_row(old, np.full(rows, 799), bins, seed=0)
  assert stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue < 1e-12


def test_min_one_span():
  """p so small that every row draws one span: exactly SPAN frames, one run (or two pieces
  at both ends of the valid length when the span wraps)."""
  lengths = [100, 60, 40]
  m = span_mask(tf.constant([0, 0]), tf.constant(lengths), 100, mask_prob=0.01, span=SPAN).numpy()
  assert m.sum(1).tolist() == [SPAN] * 3
  for row, n in zip(m, lengths):
    runs = _runs(row[:n])
    assert runs == [SPAN] or (len(runs) == 2 and sum(runs) == SPAN and row[0] and row[n - 1]), runs


def test_raw_draw_without_same_count():
  """same_count=False returns the raw span draw: counts vary per row around the expectation
  (wrapped spans are never cut at the edges, so slightly above fairseq's mean)."""
  t, b = 250, 512
  m = span_mask(tf.constant([3, 0]), tf.fill([b], t), t, mask_prob=P, span=SPAN, same_count=False).numpy()
  counts = m.sum(1)
  print(f"raw counts: mean {counts.mean():.1f} std {counts.std():.1f}, expected {expected_masked(t, P, SPAN)[t]:.1f}")
  assert counts.std() > 3 and abs(counts.mean() / t - expected_masked(t, P, SPAN)[t] / t) < 0.02


def test_deterministic_and_eager_equals_tf_data():
  lengths = np.array([249, 200, 131, 77])
  seeds = [tf.constant([s, 11], tf.int64) for s in range(4)]
  eager = [span_mask(s, tf.constant(lengths), 249, mask_prob=P, span=SPAN).numpy() for s in seeds]
  again = [span_mask(s, tf.constant(lengths), 249, mask_prob=P, span=SPAN).numpy() for s in seeds]
  for a, b in zip(eager, again):
    np.testing.assert_array_equal(a, b)
  assert any((eager[0] != e).any() for e in eager[1:])  # the seed matters
  ds = tf.data.Dataset.from_tensor_slices(tf.stack(seeds)).map(
      lambda s: span_mask(s, tf.constant(lengths), 249, mask_prob=P, span=SPAN),
      num_parallel_calls=2, deterministic=True)
  for a, b in zip(eager, ds.as_numpy_iterator()):
    np.testing.assert_array_equal(a, b)


def test_instance_norm_excludes_padding_hand_computed():
  """targets.instance_norm on a [1 layer, 2 rows, 4 frames, 2 dims] case; row 1 has 2 padded
  frames (holding garbage) that must not change the statistics and come out as 0."""
  import jax.numpy as jnp
  from d2v_jax import targets
  x = np.array([[[[1., 2.], [3., 6.], [5., 10.], [7., 14.]],
                 [[2., 0.], [4., 1.], [100., -50.], [-30., 9.]]]], np.float32)
  valid = np.array([[True, True, True, True], [True, True, False, False]])
  got = np.asarray(targets.instance_norm(jnp.asarray(x), jnp.asarray(valid)))
  # row 0: channel 0 mean 4 var 5, channel 1 mean 8 var 20; row 1 (2 frames): mean 3 var 1, mean .5 var .25
  want = np.zeros_like(x)
  want[0, 0, :, 0] = (np.array([1, 3, 5, 7]) - 4) / np.sqrt(5 + 1e-5)
  want[0, 0, :, 1] = (np.array([2, 6, 10, 14]) - 8) / np.sqrt(20 + 1e-5)
  want[0, 1, :2, 0] = (np.array([2, 4]) - 3) / np.sqrt(1 + 1e-5)
  want[0, 1, :2, 1] = (np.array([0, 1]) - 0.5) / np.sqrt(0.25 + 1e-5)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # with the audio target config (top_k layers averaged, no final norm) the result is the same
  y = targets.make_targets(jnp.asarray(x), jnp.asarray(valid), top_k=1, layer_norm_kind="instance",
                           final_norm_kind="none")
  np.testing.assert_allclose(np.asarray(y), want[0], atol=1e-5)


# ------------------------------------------------------------------ data2vec 2.0 block masks

R, A, B = 0.5, 0.05, 5   # v2 audio base (docs/algorithm.md §3.4)


def _fairseq_block_mask_1d(rng, rows: int, t: int) -> np.ndarray:
  """numpy port of fairseq compute_block_mask_1d (require_same_masks, not inverse)."""
  mask = np.zeros((rows, t), bool)
  centres = rng.integers(0, t, size=(rows, int(t * ((R + A) / B))))
  for i in range(B):
    np.put_along_axis(mask, np.clip(centres + i - B // 2, 0, t - 1), True, axis=1)
  target = int(t * R)
  for row in mask:
    n = row.sum()
    if n > target:
      row[rng.choice(np.flatnonzero(row), n - target, replace=False)] = False
    elif n < target:
      row[rng.choice(np.flatnonzero(~row), target - n, replace=False)] = True
  return mask


def test_block_mask_1d_exact_count_clones_and_spans():
  """Exactly int(T * R) masked frames per row, M distinct masks per example, and the run
  structure of fairseq's algorithm: mean run length within 10 % of the numpy port's (an
  i.i.d. mask of the same density has mean run 2.0)."""
  batch, clones = 16, 8
  for t in (49, 99, 250, 799):
    m = block_mask_1d(tf.constant([t, 1]), None, batch, clones, t, mask_prob=R, adjust=A, length=B).numpy()
    assert m.shape == (batch, clones, t) and m.dtype == bool
    assert (m.sum(-1) == int(t * R)).all(), (t, np.unique(m.sum(-1)))
    for ex in m:  # M distinct masks per example
      assert len({row.tobytes() for row in ex}) == clones
    ours = np.concatenate([_runs(r) for r in m.reshape(-1, t)])
    ref = np.concatenate([_runs(r) for r in _fairseq_block_mask_1d(np.random.default_rng(t), batch * clones, t)])
    print(f"T={t}: mean run {ours.mean():.2f} (fairseq port {ref.mean():.2f}), "
          f"masked frames in runs >= B: {ours[ours >= B].sum() / ours.sum():.2f}")
    assert abs(ours.mean() / ref.mean() - 1) < 0.1
    assert ours.mean() > 3.5 and ours[ours >= B].sum() / ours.sum() > 0.5


def test_block_mask_1d_row_lengths_deterministic_eager_equals_tf_data():
  """Per-example valid lengths: int(n * R) masked, none in the padding; the same seed gives
  the same masks eagerly and inside tf.data; another seed other masks."""
  lengths = np.array([99, 60, 37])
  m = block_mask_1d(tf.constant([0, 0]), tf.constant(lengths), 3, 4, 99, mask_prob=R, adjust=A, length=B).numpy()
  for ex, n in zip(m, lengths):
    assert (ex.sum(-1) == int(n * R)).all() and not ex[:, n:].any()
  fn = lambda s: block_mask_1d(s, 99, 4, 2, 99, mask_prob=R, adjust=A, length=B)
  seeds = [tf.constant([s, 5], tf.int64) for s in range(4)]
  eager = [fn(s).numpy() for s in seeds]
  ds = tf.data.Dataset.from_tensor_slices(tf.stack(seeds)).map(fn, num_parallel_calls=2, deterministic=True)
  for a, b in zip(eager, ds.as_numpy_iterator()):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(eager[0], fn(seeds[0]).numpy())
  assert all((eager[0] != e).any() for e in eager[1:])


def test_block_mask_1d_mixed_lengths_spread_over_each_valid_length():
  """v2 masks on a mixed-length batch (the unbucketed case): every row's int(n * R) masked
  frames spread over its own valid length: in each fifth of it the masked share is R within
  0.05 (over 200 seeds); the former first-m truncation would leave the last fifths of a long
  row next to a short one unmasked."""
  lengths = np.array([99, 71, 40, 23])
  counts = {n: np.zeros(5) for n in lengths}
  for s in range(200):
    m = block_mask_1d(tf.constant([s, 3], tf.int64), tf.constant(lengths), 4, 2, 99,
                      mask_prob=R, adjust=A, length=B).numpy()
    for ex, n in zip(m, lengths):
      assert (ex.sum(-1) == int(n * R)).all() and not ex[:, n:].any()
      fifth = (np.arange(n) * 5) // n
      counts[n] += np.bincount(fifth, weights=ex[:, :n].sum(0), minlength=5)
  for n, c in counts.items():
    per_fifth = np.bincount((np.arange(n) * 5) // n, minlength=5) * 200 * 2
    share = c / per_fifth
    print(f"n={n}: masked share per fifth {np.round(share, 3)}")
    assert np.abs(share - int(n * R) / n).max() < 0.05, (n, share)
