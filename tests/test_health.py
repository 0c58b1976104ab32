"""Health metrics: effective rank, per-layer target std, cosine, teacher distance, and the
in-training rank / probe hook writing to metrics.jsonl at the configured steps."""

import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from d2v_jax import build as build_lib, eval_hook, health, metrics as metrics_lib, targets as T, validate
from d2v_jax.data import text_tokenizer
from d2v_jax.config import ConfigError
from d2v_jax.probe import features, rank as rankme
from d2v_jax.data import text as text_data
from step_utils import moving_text_config, tiny_text_config


# ----------------------------------------------------------------------- effective rank


def test_effective_rank_of_known_matrices():
  assert rankme.effective_rank(np.eye(16)) == pytest.approx(16.0, rel=1e-4)
  u, v = np.arange(1.0, 9.0), np.linspace(-1, 2, 5)
  assert rankme.effective_rank(np.outer(u, v)) == pytest.approx(1.0, abs=1e-4)
  # singular values (3, 1): p = (3/4, 1/4), exp(-(3/4 ln 3/4 + 1/4 ln 1/4)) = 1.754765...
  want = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
  assert want == pytest.approx(1.7548, abs=1e-4)
  assert rankme.effective_rank(np.diag([3.0, 1.0, 0.0])) == pytest.approx(want, rel=1e-5)
  # a rotated copy has the same singular values
  q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
  assert rankme.effective_rank(q @ np.diag([3.0, 1.0, 0.0])) == pytest.approx(want, rel=1e-5)


def test_effective_rank_from_gram_equals_svd():
  x = np.random.default_rng(1).normal(size=(200, 12)) * np.linspace(0.1, 3, 12)
  assert rankme.effective_rank_from_gram(x.T @ x) == pytest.approx(rankme.effective_rank(x), rel=1e-6)


# ----------------------------------------------------------------------- in-step effective rank

# RankMe of singular values (3, 1): p = (3/4, 1/4) -> exp(H(p)) = 1.754765...
RANK_31 = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def _hadamard_rows(spectrum):
  """8 rows x D = len(spectrum) (a power of 2 <= 4) whose correlation matrix has eigenvalues
  proportional to `spectrum`: X = Z diag(sqrt(spectrum)) Q^T with Z = 4 centred orthonormal
  Hadamard columns and Q = H_D / sqrt(D) (all |entries| equal, so every channel has the same
  variance and the correlation is the covariance over its mean)."""
  from scipy.linalg import hadamard
  d = len(spectrum)
  z = hadamard(8)[:, 1:d + 1] / math.sqrt(8)   # columns sum to 0: already centred
  q = hadamard(d) / math.sqrt(d)
  return z @ np.diag(np.sqrt(spectrum)) @ q.T


def test_in_step_rank_matches_closed_forms():
  rank = lambda x, w: float(health.masked_effective_rank(jnp.asarray(x, jnp.float32), jnp.asarray(w)))
  eps_bump = lambda d: math.exp(d * 1e-7 * math.log(1 / 1e-7))  # RankMe's +1e-7 per entry, ~1
  # identity correlation (4 uncorrelated channels of equal variance): rank D
  assert rank(_hadamard_rows([1.0, 1, 1, 1]), np.ones(8)) == pytest.approx(4.0, rel=1e-5)
  # correlation eigenvalues (9, 1, 0, 0): singular values (3, 1) -> 1.7548
  assert RANK_31 == pytest.approx(1.754765, abs=1e-6)
  x = _hadamard_rows([9.0, 1, 0, 0])
  assert rank(x, np.ones(8)) == pytest.approx(RANK_31, rel=1e-5)
  # rank 1: every row on one line, 16 channels (eigenvalues at rounding noise count as 0)
  rng = np.random.default_rng(0)
  one = rng.normal(size=(200, 1)) @ rng.normal(size=(1, 16))
  assert rank(one, np.ones(200)) == pytest.approx(1.0, abs=1e-4)
  assert rank(one, np.ones(200)) == pytest.approx(eps_bump(15), rel=1e-5)
  # rows outside the mask do not count: [B, T, D] with garbage at unmasked positions
  xb = np.concatenate([x, rng.normal(size=(8, 4)) * 50])[None]     # [1, 16, 4]
  wb = np.r_[np.ones(8), np.zeros(8)][None].astype(bool)
  assert rank(xb, wb) == pytest.approx(RANK_31, rel=1e-5)
  assert rank(xb, np.ones((1, 16), bool)) > 2.5
  # invariant to per-channel scale (and offset): 1e-2 .. 1e2
  scale, shift = np.array([1e-2, 3.0, 70.0, 1e2]), np.array([5.0, -1, 0, 1e3])
  assert rank(x * scale + shift, np.ones(8)) == pytest.approx(RANK_31, rel=1e-5)
  g = rng.normal(size=(3, 40, 16)) @ rng.normal(size=(16, 16))    # correlated channels
  w = rng.random((3, 40)) < 0.6
  r0 = rank(g, w)
  assert 2.0 < r0 < 16.0
  assert rank(g * np.geomspace(1e-2, 1e2, 16), w) == pytest.approx(r0, rel=1e-4)
  # = the float64 RankMe of the standardised masked rows (the offline function)
  rows = g[w]
  std = (rows - rows.mean(0)) / rows.std(0)
  assert r0 == pytest.approx(rankme.effective_rank(std), rel=1e-4)
  # a dead (constant) channel adds nothing: rank of 4 equal channels + 1 constant = 4
  x5 = np.c_[_hadamard_rows([1.0, 1, 1, 1]), np.full(8, 3.0)]
  assert rank(x5, np.ones(8)) == pytest.approx(4.0, rel=1e-5)


def test_masked_channel_var_hand_computed():
  # B=1, T=3, C=2; frame 2 invalid. channel 0 {1, 3} -> var 1; channel 1 {0, 4} -> var 4
  x = jnp.asarray([[[1.0, 0.0], [3.0, 4.0], [100.0, -100.0]]])
  assert float(health.masked_channel_var(x, jnp.asarray([[True, True, False]]))) == pytest.approx(2.5)
  # all frames: channel 0 {1, 3, 100} var 2156.22..., channel 1 {0, 4, -100} var 2327.55...
  want = (np.var([1.0, 3, 100]) + np.var([0.0, 4, -100])) / 2
  assert float(health.masked_channel_var(x, None)) == pytest.approx(want, rel=1e-6)


# ----------------------------------------------------------------------- per-step metrics


def test_layer_target_std_hand_computed():
  # K=2 layers, B=1, T=3, D=2; mask covers positions 0 and 1.
  l1 = np.array([[[3.0, 1.0], [0.0, 2.0], [5.0, 5.0]]])
  l2 = np.array([[[1.0, 4.0], [3.0, 0.0], [9.0, 9.0]]])
  top = jnp.asarray(np.stack([l1, l2]))
  mask = jnp.asarray([[True, True, False]])
  # no per-layer norm: per-dim unbiased std over the 2 masked positions, averaged over dims
  # l1: dim0 {3, 0} -> std 2.1213, dim1 {1, 2} -> 0.7071 -> mean 1.4142
  # l2: dim0 {1, 3} -> 1.4142, dim1 {4, 0} -> 2.8284 -> mean 2.1213
  got = np.asarray(health.layer_target_std(top, None, mask, "none"))
  np.testing.assert_allclose(got, [math.sqrt(2), 1.5 * math.sqrt(2)], rtol=1e-5)
  # LayerNorm over 2 channels maps each masked token to +-(1, -1)/sqrt(1 + eps/d^2), d = half
  # the channel gap (1 in l1; 1.5 and 2 in l2): every dim then holds {+a, -a'}.
  got = np.asarray(health.layer_target_std(top, None, mask, "layer"))
  s = lambda d: 1 / math.sqrt(1 + T.EPS / d ** 2)
  a = [(s(1.0), s(1.0)), (s(1.5), s(2.0))]
  want = [math.sqrt((x + y) ** 2 / 2) for x, y in a]  # std of {x, -y} with n - 1 = 1
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_masked_cosine_and_relative_distance_hand_computed():
  pred = jnp.asarray([[[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]]])
  target = jnp.asarray([[[0.0, 1.0], [2.0, 2.0], [-1.0, 0.0]]])
  mask = jnp.asarray([[True, True, False]])  # cos = 0, 1 (and -1, not counted)
  assert float(health.masked_cosine(pred, target, mask)) == pytest.approx(0.5, abs=1e-6)
  teacher = {"a": jnp.asarray([3.0, 4.0]), "b": {"c": jnp.asarray([[0.0]])}}
  student = {"a": jnp.asarray([3.0, 0.0]), "b": {"c": jnp.asarray([[0.0]])}}
  assert float(health.relative_distance(teacher, student)) == pytest.approx(4 / 3, rel=1e-6)


def test_train_step_logs_health_metrics():
  """One step at lr 1e-3 (no warm-up: at lr 0 the student would not move and teacher_dist
  would be 0 on both sides) with tau 0.9."""
  cfg = moving_text_config()
  cfg.target.top_k = 1   # then target_var_l2 is the std of the (only) target layer
  built = build_lib.build(cfg, devices=jax.devices()[:1])
  state = built.init(cfg.seed)
  state0 = jax.device_get(state)  # the step donates its input
  batch = build_lib.to_global(text_data.example_batch(cfg, cfg.batch_size), built.batch_shardings)
  state1, m = jax.device_get(built.step(state, batch))
  m = {k: float(v) for k, v in m.items()}
  assert {"target_var_l2", "pred_target_cos", "teacher_dist", "tau"} <= set(m)
  assert "target_var_l1" not in m
  assert m["target_var_l2"] == pytest.approx(m["target_var"], rel=1e-6)
  assert -1.0 <= m["pred_target_cos"] <= 1.0
  # teacher_1 = tau s0 + (1 - tau) s1 -> ||teacher_1 - s1|| / ||s1|| = tau ||s0 - s1|| / ||s1||
  s0, s1 = state0.params["encoder"], state1.params["encoder"]
  diff = math.sqrt(sum(float(np.sum((np.asarray(a) - np.asarray(b)) ** 2))
                       for a, b in zip(jax.tree_util.tree_leaves(s0), jax.tree_util.tree_leaves(s1))))
  norm = math.sqrt(sum(float(np.sum(np.asarray(a) ** 2)) for a in jax.tree_util.tree_leaves(s1)))
  assert m["tau"] == pytest.approx(0.9) and diff > 1e-2 * norm   # the student moved (1.7 %)
  # measured gap 1e-9 relative; the teacher not updated (or compared with the student before
  # the update) gives 1 / tau times this value (+11 %), no teacher part 0
  assert m["teacher_dist"] == pytest.approx(m["tau"] * diff / norm, rel=1e-3)
  # with top_k = K the last K layers are logged, 1-based
  assert health.layer_names(2, 2) == ["target_var_l1", "target_var_l2"]
  assert health.layer_names(12, 3) == ["target_var_l10", "target_var_l11", "target_var_l12"]


def test_train_step_rank_metrics_every_n_steps():
  """rank_target of a real step = the float64 RankMe of the standardised targets at the masked
  positions; eval.step_rank_every=2 computes it on even steps only (NaN between), and the log
  window averages the steps that computed it."""
  from d2v_jax import step as step_lib
  cfg = tiny_text_config()
  cfg.eval.step_rank_every = 2
  built = build_lib.build(cfg, devices=jax.devices()[:2])   # the cond on a sharded batch
  state = built.init(cfg.seed)
  host_batch = text_data.example_batch(cfg, cfg.batch_size)
  targets = jax.jit(lambda p, t, b: step_lib.teacher_targets(built.model, p, t, b, cfg)[0])
  y = targets(state.params, state.teacher, host_batch)
  rows = np.asarray(y, np.float64)[np.asarray(host_batch["mask"])]
  want = rankme.effective_rank((rows - rows.mean(0)) / rows.std(0))
  window, got = metrics_lib.Window(), []
  for _ in range(3):
    state, m = built.step(state, build_lib.to_global(host_batch, built.batch_shardings))
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    got.append(m)
    window.add(m)
  assert 8.0 < want < 64.0   # random init on synthetic ids: 13.4 of the 64 channels
  assert got[0]["rank_target"] == pytest.approx(want, rel=1e-3)
  assert 1.0 < got[0]["rank_pred"] <= 64.0
  assert math.isnan(got[1]["rank_target"]) and math.isnan(got[1]["rank_pred"])
  assert math.isfinite(got[2]["rank_target"]) and math.isfinite(got[2]["loss"])
  mean = window.mean()
  assert mean["rank_target"] == pytest.approx((got[0]["rank_target"] + got[2]["rank_target"]) / 2)
  assert mean["loss"] == pytest.approx(sum(g["loss"] for g in got) / 3)
  window.add(got[1])   # a window without a computed rank logs no rank keys (no NaN in JSON)
  assert set(window.mean()) == set(got[1]) - {"rank_target", "rank_pred"}


# ----------------------------------------------------------------------- in-training hook

WORDS_A = "apple orange banana grape melon lemon cherry peach plum pear".split()
WORDS_B = "river mountain forest valley ocean desert island canyon meadow lake".split()


def _tiny_text_run(tmp_path, rank_every: int, probe_every: int):
  from d2v_jax.data import text as text_data
  rng = np.random.default_rng(0)
  lines = []
  for i in range(80):
    words = WORDS_A if i % 2 == 0 else WORDS_B
    lines.append((" ".join(rng.choice(words, size=6)), "fruit" if i % 2 == 0 else "land"))
  tsv = tmp_path / "probe.tsv"
  tsv.write_text("".join(f"{t}\t{y}\n" for t, y in lines))
  tok_dir = str(tmp_path / "tok")
  text_tokenizer.train_tokenizer([t for t, _ in lines] * 5, 300, tok_dir)
  cfg = tiny_text_config()
  cfg.data.tokenizer = tok_dir
  cfg.model.vocab_size = len(text_data.load_tokenizer(tok_dir))
  cfg.eval = ml_collections.ConfigDict(dict(
      rank_every=rank_every, probe_every=probe_every, probe_data=str(tsv),
      probe_weights="teacher", layer=-1, rank_examples=32, probe_chunk=16, probe_seed=0,
      probe_test_frac=0.3))
  return cfg


def test_hook_writes_rank_and_probe_at_configured_steps(tmp_path):
  cfg = _tiny_text_run(tmp_path, rank_every=2, probe_every=3)
  built = build_lib.build(cfg, devices=jax.devices()[:2])  # 2 batch shards: chunking + sharding
  state = built.init(0)
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  hook = eval_hook.Hook(cfg, built, workdir)
  writer = metrics_lib.Writer(workdir)
  outs = {s: hook(s, state, writer) for s in range(1, 7)}
  writer.close()
  rows = metrics_lib.read(workdir)
  by_step = {r["step"]: set(r) - {"step"} for r in rows}
  rank_keys = {"rank_student", "rank_teacher"}
  probe_keys = {"probe_linear_acc", "probe_knn_acc", "probe_chance"}
  assert by_step == {2: rank_keys, 3: probe_keys, 4: rank_keys, 6: rank_keys | probe_keys}
  assert outs[1] == {} and outs[5] == {}
  r = outs[2]
  # at init the teacher is the student: same features, same rank; 64 channels bound it
  assert r["rank_student"] == pytest.approx(r["rank_teacher"], rel=1e-6)
  assert 1.0 < r["rank_student"] <= 64.0
  # the two classes use disjoint words: even random features separate them
  assert outs[3]["probe_linear_acc"] >= 0.95
  assert outs[3]["probe_chance"] == pytest.approx(0.5, abs=0.05)
  assert outs[6]["probe_linear_acc"] == outs[3]["probe_linear_acc"]  # same state, same split
  # the hook's rank is the RankMe of the token features of its fixed batch
  enc = features.FeatureEncoder(built, -1, chunk=16)
  feats = enc(state.params, hook._fixed_batch())
  assert r["rank_student"] == pytest.approx(rankme.effective_rank_from_gram(feats.gram), rel=1e-6)
  # ... and rank_teacher that of the teacher's: a teacher unlike the student (another seed's
  # encoder; the shared embedding stays the student's) has its own rank
  other = state.replace(teacher=built.init(1).teacher)
  again = eval_hook.Hook(cfg, built, workdir)
  w2 = metrics_lib.Writer(str(tmp_path))
  r2 = again(2, other, w2)
  w2.close()
  from d2v_jax import ema
  teacher_feats = enc(ema.teacher_params(other.params, other.teacher), again._fixed_batch())
  assert r2["rank_student"] == pytest.approx(r["rank_student"], rel=1e-6)
  assert r2["rank_teacher"] == pytest.approx(rankme.effective_rank_from_gram(teacher_feats.gram),
                                             rel=1e-6)
  # measured 40.12 vs 40.16: 100x the 1e-6 of the equalities above
  assert abs(r2["rank_teacher"] - r2["rank_student"]) > 1e-4 * r2["rank_student"]


def test_hook_is_off_without_eval_keys_and_bad_eval_keys_fail_validation():
  cfg = tiny_text_config()
  hook = eval_hook.Hook(cfg, None, "/nonexistent")
  assert not hook.active and hook(10, None, None) == {}
  cfg.eval.update(dict(probe_every=5, probe_data=""))
  with pytest.raises(ConfigError, match="eval.probe_data"):
    validate.validate(cfg)
  cfg.eval.update(dict(probe_every=0, rank_every=5, layer=3))  # the tiny model has 2
  with pytest.raises(ConfigError, match=r"eval.layer=3: use 1..2"):
    validate.validate(cfg)
  cfg.eval.update(dict(layer=-1, probe_weights="ema"))
  with pytest.raises(ConfigError, match=r"eval.probe_weights='ema': use student or teacher"):
    validate.validate(cfg)
