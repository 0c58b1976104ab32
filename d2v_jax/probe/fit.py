"""Stratified, seeded splits and the two probes on pooled features: multinomial logistic
regression and k-NN (cosine), both on standardised features."""

from __future__ import annotations

import numpy as np

from d2v_jax.config import ConfigError


def split(labels: np.ndarray, test_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Stratified, seeded train / test indices."""
  # sklearn is imported where a probe runs: ~1 s that every trainer start would pay otherwise
  from sklearn.model_selection import train_test_split
  counts = np.bincount(labels)
  if (counts[counts > 0] < 2).any():
    raise ConfigError("every class needs at least 2 examples for a stratified split; "
                      f"class sizes: {counts.tolist()}")
  if not 0.0 < test_frac < 1.0:
    raise ConfigError(f"test fraction {test_frac} must be in (0, 1)")
  idx = np.arange(len(labels))
  train, test = train_test_split(idx, test_size=test_frac, stratify=labels, random_state=seed)
  return np.sort(train), np.sort(test)


def fit_probes(x: np.ndarray, labels: np.ndarray, *, seed: int = 0, test_frac: float = 0.3,
               k: int = 20, c: float = 1.0, indices=None) -> dict:
  """Linear (logistic regression) and k-NN (cosine) test accuracy on standardised features.

  `chance` is the majority-class fraction of the test split (what a constant guess scores).
  """
  # (sklearn: see split, import cost)
  from sklearn.linear_model import LogisticRegression
  from sklearn.neighbors import KNeighborsClassifier
  from sklearn.preprocessing import StandardScaler
  x = np.asarray(x, np.float64)
  if not np.isfinite(x).all():
    raise ValueError("features hold NaN / inf: the checkpoint is broken (non-finite weights)")
  train, test = indices if indices is not None else split(labels, test_frac, seed)
  scaler = StandardScaler().fit(x[train])
  xtr, xte = scaler.transform(x[train]), scaler.transform(x[test])
  ytr, yte = labels[train], labels[test]
  lin = LogisticRegression(C=c, max_iter=3000).fit(xtr, ytr)
  kk = min(k, len(train))
  knn = KNeighborsClassifier(n_neighbors=kk, metric="cosine", algorithm="brute").fit(xtr, ytr)
  return {"linear_acc": float((lin.predict(xte) == yte).mean()),
          "knn_acc": float((knn.predict(xte) == yte).mean()),
          "chance": float(np.bincount(yte).max() / len(yte)),
          "n_train": int(len(train)), "n_test": int(len(test)), "k": int(kk)}


def fit_probes_repeated(x: np.ndarray, labels: np.ndarray, splits: list, **kw) -> dict:
  """fit_probes over several (train, test) splits: means, standard deviations, and each split."""
  runs = [fit_probes(x, labels, indices=ix, **kw) for ix in splits]
  out = dict(runs[0])
  for key in ("linear_acc", "knn_acc", "chance"):
    vals = np.array([r[key] for r in runs])
    out[key], out[key + "_std"] = float(vals.mean()), float(vals.std())
  out["splits"] = [{k: r[k] for k in ("linear_acc", "knn_acc", "chance")} for r in runs]
  return out
