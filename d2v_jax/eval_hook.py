"""The trainer's evaluation during training: every eval.rank_every steps the effective rank
(RankMe) of the student's and the teacher's token features on a fixed batch, every
eval.probe_every steps a linear / k-NN probe on the labelled set eval.probe_data, written to
the run's metrics files (d2v_jax/train.py calls `Hook` after every step)."""

from __future__ import annotations

import sys

import jax
import numpy as np

from d2v_jax import ema
from d2v_jax.probe.features import FeatureEncoder
from d2v_jax.probe.fit import fit_probes
from d2v_jax.probe.rank import effective_rank_from_gram


class Hook:
  """Called by the trainer after every step: `hook(step, state, writer)`.

  Every eval.rank_every steps: rank_student / rank_teacher = RankMe of the token features
  (layer eval.layer, valid non-extra tokens) of a fixed batch of eval.rank_examples examples
  (the labelled probe set when there is one, else the start of the training stream).
  Every eval.probe_every steps: probe_linear_acc / probe_knn_acc (+ probe_chance) of a linear
  and a k-NN probe on the mean-pooled features of eval.probe_data (eval.probe_weights).
  Every process must call it (the forward passes are collective); process 0 writes.
  """

  def __init__(self, cfg, built, workdir: str):
    self.cfg, self.built, self.workdir = cfg, built, workdir
    self.e = cfg.eval    # checked by d2v_jax/validate.py
    self._encoder = None
    self._probe_set = None
    self._rank_batch = None
    if self.active and self.e["probe_data"]:
      self._labelled()  # a bad probe set fails at start-up too

  @property
  def active(self) -> bool:
    return bool(self.e["rank_every"] or self.e["probe_every"])

  def due(self, step: int) -> tuple[bool, bool]:
    r, p = self.e["rank_every"], self.e["probe_every"]
    return bool(r and step % r == 0), bool(p and step % p == 0)

  def _enc(self):
    if self._encoder is None:
      self._encoder = FeatureEncoder(self.built, self.e["layer"], chunk=self.e["probe_chunk"])
    return self._encoder

  def _labelled(self):
    if self._probe_set is None:
      self._probe_set = self.built.modality.data.labelled_set(self.cfg, self.workdir,
                                                                self.e["probe_data"])
    return self._probe_set

  def _fixed_batch(self) -> dict:
    if self._rank_batch is None:
      n = int(self.e["rank_examples"])
      if self.e["probe_data"]:  # a seeded subset, so every class is in it
        arrays = self._labelled().arrays
        some = next(iter(arrays.values()))
        idx = np.sort(np.random.default_rng(0).permutation(len(some))[:n])
        arrays = {k: np.asarray(v)[idx] for k, v in arrays.items()}
      else:  # the first examples of the training stream: a pure function of the config
        it = iter(self.built.modality.data.build_dataset(self.cfg, self.workdir, start_step=0,
                                                         process_index=0, process_count=1))
        rows, got = [], 0
        while got < n:
          b = next(it)
          rows.append(b)
          got += len(b["mask"])
        arrays = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
      self._rank_batch = {k: np.asarray(v)[:n] for k, v in arrays.items()}
    return self._rank_batch

  def __call__(self, step: int, state, writer) -> dict:
    do_rank, do_probe = self.due(step)
    if not (do_rank or do_probe):
      return {}
    # The step that made `state` may still run: one program at a time (on CPU, the collectives
    # of two programs in flight can deadlock XLA's rendezvous).
    jax.block_until_ready(state)
    out: dict = {}
    student = state.params
    teacher = ema.teacher_params(state.params, state.teacher)
    if do_rank:
      batch = self._fixed_batch()
      for name, params in (("student", student), ("teacher", teacher)):
        feats = self._enc()(params, batch)
        out[f"rank_{name}"] = effective_rank_from_gram(feats.gram)
    if do_probe:
      ds = self._labelled()
      params = student if self.e["probe_weights"] == "student" else teacher
      feats = self._enc()(params, ds.arrays)
      if jax.process_index() == 0:
        res = fit_probes(feats.pooled, ds.labels, seed=self.e["probe_seed"],
                               test_frac=self.e["probe_test_frac"])
        out.update(probe_linear_acc=res["linear_acc"], probe_knn_acc=res["knn_acc"],
                   probe_chance=res["chance"])
    if out and jax.process_index() == 0:
      writer.write(step, out)
      print(f"eval step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in out.items()),
            file=sys.stdout, flush=True)
    return out
