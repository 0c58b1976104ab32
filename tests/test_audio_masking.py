"""Audio span masking (d2v_jax/data/masking_audio.py) and the instance-norm targets on padding."""

from __future__ import annotations

import types

import numpy as np
import pytest
import tensorflow as tf

from d2v_jax.data.masking_audio import conv_output_length, span_mask

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


def test_same_count_spans_and_padding():
  for trial, t, lengths in _random_batches(150):
    m = span_mask(tf.constant([trial, 3]), tf.constant(lengths), t, mask_prob=P, span=SPAN).numpy()
    counts = m.sum(1)
    assert len(set(counts.tolist())) == 1, (trial, counts)                 # require_same_masks
    assert counts[0] >= min(SPAN, lengths.min())                          # min_spans=1
    for i, n in enumerate(lengths):
      assert not m[i, n:].any(), (trial, i)                               # padding never masked
      runs = _runs(m[i])
      if lengths.min() >= SPAN:
        assert min(runs) >= SPAN, (trial, i, runs, lengths)               # whole spans only
      else:
        assert all(r >= SPAN or r >= lengths.min() for r in runs)          # clipped by a short row


def test_mask_ratio_matches_hf_reference():
  """Without the equal-count step our per-row draw is fairseq's / HF's: mean masked fraction
  over many batches agrees with transformers' _compute_mask_indices (numpy RNG) to 0.01."""
  from transformers.models.data2vec.modeling_data2vec_audio import _compute_mask_indices
  t, b, n = 250, 16, 40
  ours = np.mean([span_mask(tf.constant([s, 0]), tf.fill([b], t), t, mask_prob=P, span=SPAN,
                            same_count=False).numpy().mean() for s in range(n)])
  np.random.seed(0)
  ref = np.mean([_compute_mask_indices((b, t), P, SPAN, min_masks=1).mean() for _ in range(n)])
  print(f"masked fraction: ours {ours:.4f}, HF {ref:.4f}")
  assert abs(ours - ref) < 0.01
  assert 0.40 < ours < 0.50  # 1 - overlap losses from p=0.65 x span 10 (paper: ~49 %)
  # same_count only trims: each row keeps the batch minimum of its own count
  eq = span_mask(tf.constant([1, 0]), tf.fill([b], t), t, mask_prob=P, span=SPAN).numpy()
  raw = span_mask(tf.constant([1, 0]), tf.fill([b], t), t, mask_prob=P, span=SPAN, same_count=False).numpy()
  assert eq.sum(1)[0] == raw.sum(1).min() and (eq & ~raw).sum() <= SPAN * b


def test_min_one_span():
  m = span_mask(tf.constant([0, 0]), tf.constant([100, 60, 40]), 100, mask_prob=0.01, span=SPAN).numpy()
  assert m.sum(1).tolist() == [SPAN] * 3 and all(_runs(r) == [SPAN] for r in m)


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
