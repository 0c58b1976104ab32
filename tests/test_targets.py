"""Targets and losses on tiny hand-computed cases (docs/algorithm.md §1.2-1.3)."""

import numpy as np
import jax.numpy as jnp
import pytest

from d2v_jax import targets as T


def test_layer_norm_matches_hand_computation():
  x = np.array([[1.0, 2.0, 3.0, 6.0]])
  mean, var = 3.0, np.mean((x - 3.0) ** 2)  # 3.5
  want = (x - mean) / np.sqrt(var + 1e-5)
  np.testing.assert_allclose(T.layer_norm(jnp.asarray(x)), want, rtol=1e-6)


def test_top_k_average_of_layer_normed_layers():
  # 3 layers, B=1, T=2, D=2. Top-2 = layers 1 and 2. LN of a 2-vector [a, b] is +-1 (up to eps).
  layers = np.array([
      [[[100.0, -100.0], [5.0, 5.0]]],     # layer 0: must not enter the average
      [[[1.0, 3.0], [2.0, 0.0]]],          # LN -> [-1, 1], [1, -1]
      [[[4.0, 2.0], [0.0, 10.0]]],         # LN -> [1, -1], [-1, 1]
  ], np.float32)
  ln = lambda a, b: np.array([a - b, b - a]) / 2 / np.sqrt(((a - b) / 2) ** 2 + 1e-5)
  want = np.stack([(ln(1, 3) + ln(4, 2)) / 2, (ln(2, 0) + ln(0, 10)) / 2])[None]
  got = T.make_targets(jnp.asarray(layers), None, top_k=2, layer_norm_kind="layer", final_norm_kind="none")
  np.testing.assert_allclose(got, want, atol=1e-6)
  # With a final LayerNorm (vision) the average is normalised again.
  got_final = T.make_targets(jnp.asarray(layers), None, top_k=1, layer_norm_kind="none",
                             final_norm_kind="layer")
  np.testing.assert_allclose(got_final[0, 1], ln(0, 10), atol=1e-6)


def test_instance_norm_excludes_padding():
  # B=1, T=4 (last step padded), D=1: stats over the 3 valid steps only.
  x = np.array([[[1.0], [2.0], [6.0], [1000.0]]], np.float32)
  valid = np.array([[True, True, True, False]])
  mean = 3.0
  var = ((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 3  # 14/3
  want = np.array([[[(1 - mean)], [(2 - mean)], [(6 - mean)], [0.0]]]) / np.sqrt(var + 1e-5)
  want[0, 3] = 0.0
  got = T.instance_norm(jnp.asarray(x), jnp.asarray(valid))
  np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 1.0, 4.0])
def test_smooth_l1_matches_torch(beta):
  import torch
  rng = np.random.RandomState(0)
  p, y = rng.randn(3, 5).astype(np.float32) * 3, rng.randn(3, 5).astype(np.float32)
  if beta == 0:
    want = torch.nn.functional.mse_loss(torch.tensor(p), torch.tensor(y), reduction="none").numpy()
  else:
    want = torch.nn.functional.smooth_l1_loss(torch.tensor(p), torch.tensor(y), beta=beta,
                                              reduction="none").numpy()
  np.testing.assert_allclose(T.elementwise_loss(jnp.asarray(p), jnp.asarray(y), beta), want, rtol=1e-6)


def test_regression_loss_reductions():
  # B=1, T=3, D=4; positions 0 and 2 masked. Squared error.
  pred = np.zeros((1, 3, 4), np.float32)
  tgt = np.array([[[1, 1, 1, 1], [9, 9, 9, 9], [2, 0, 0, 0]]], np.float32)
  mask = np.array([[True, False, True]])
  # fairseq: sum over D (4 and 4) * scale, mean over 2 masked positions.
  loss, n = T.regression_loss(jnp.asarray(pred), jnp.asarray(tgt), jnp.asarray(mask), beta=0.0,
                              scale=None, reduce_dims="sum")
  assert float(n) == 2
  np.testing.assert_allclose(float(loss), (4 + 4) / 2 / np.sqrt(4), rtol=1e-6)
  loss1, _ = T.regression_loss(jnp.asarray(pred), jnp.asarray(tgt), jnp.asarray(mask), beta=0.0,
                               scale=1.0, reduce_dims="sum")
  np.testing.assert_allclose(float(loss1), 4.0, rtol=1e-6)
  # data2vec_vision: mean over D and masked positions.
  loss2, _ = T.regression_loss(jnp.asarray(pred), jnp.asarray(tgt), jnp.asarray(mask), beta=0.0,
                               scale=None, reduce_dims="mean")
  np.testing.assert_allclose(float(loss2), (1 + 1) / 2, rtol=1e-6)


def test_masked_std_mean_matches_fairseq_compute_var():
  import torch
  rng = np.random.RandomState(1)
  x = rng.randn(2, 5, 3).astype(np.float32)
  mask = rng.rand(2, 5) > 0.4
  sel = torch.tensor(x[mask])
  want = torch.sqrt(sel.var(dim=0) + 1e-6).mean().item()
  np.testing.assert_allclose(float(T.masked_std_mean(jnp.asarray(x), jnp.asarray(mask))), want, rtol=1e-5)
