"""RankMe (Garrido et al. 2023): the effective rank of a feature matrix X [N, D],
exp(entropy(p)), p_k = s_k / sum(s) + eps over its singular values s. 1 = every row on one
line; D = D equally strong directions. In float64, on the host (probes, the in-training
hook); d2v_jax/health.py computes the same statistic inside the train step."""

from __future__ import annotations

import numpy as np

RANK_EPS = 1e-7  # RankMe's epsilon on the normalised singular values


def effective_rank_from_singular_values(s) -> float:
  s = np.abs(np.asarray(s, np.float64))
  p = s / max(s.sum(), 1e-300) + RANK_EPS
  return float(np.exp(-(p * np.log(p)).sum()))


def effective_rank(x) -> float:
  """RankMe of a feature matrix x [N, D] (rows = samples; not centred, as in RankMe)."""
  return effective_rank_from_singular_values(np.linalg.svd(np.asarray(x, np.float64), compute_uv=False))


def effective_rank_from_gram(gram) -> float:
  """RankMe from G = X^T X [D, D]: the singular values of X are sqrt(eig(G))."""
  g = np.asarray(gram, np.float64)
  lam = np.linalg.eigvalsh((g + g.T) / 2)
  return effective_rank_from_singular_values(np.sqrt(np.clip(lam, 0.0, None)))
