"""Run guards: non-finite steps are skipped and counted, and the policy (stop / rollback) fires
after guards.max_nonfinite in a row; a collapsed teacher triggers guards.collapse_policy
(warn / stop / rollback) with the numbers in the message."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from d2v_jax import build as build_lib, config as config_lib, metrics, train, validate
from d2v_jax.data import text as text_data
from reliability_utils import assert_states_equal, load_state, parse, text_args, text_setup


def _guards(**kw):
  """Guards of a validated config (d2v_jax/validate.py checks the guard keys)."""
  cfg = config_lib.load_file("configs/text.py:variant=tiny,runlocal")
  cfg.guards.update(dict(min_target_var=0.0, min_pred_var=0.0, collapse_after=5,
                         collapse_policy="stop", max_nonfinite=2, nonfinite_policy="stop",
                         max_rollbacks=3, min_target_rank=0.0, rank_window=1, rank_after=0))
  cfg.guards.update(kw)
  validate.validate(cfg)
  return metrics.Guards(cfg.guards)


def _m(nonfinite=0, target_var=1.0, pred_var=1.0):
  return {"nonfinite": nonfinite, "target_var": target_var, "pred_var": pred_var,
          "loss": float("nan") if nonfinite else 1.0}


def test_nonfinite_counter_fires_after_more_than_max_in_a_row():
  g = _guards(max_nonfinite=2, nonfinite_policy="rollback")
  assert g.check(1, _m()) is None and g.healthy
  assert g.check(2, _m(1)) is None and g.check(3, _m(1)) is None and not g.healthy
  assert g.check(4, _m()) is None and g.healthy           # a finite step ends the run of skips
  assert [g.check(s, _m(1)) for s in (5, 6)] == [None, None]
  v = g.check(7, _m(1))
  assert (v.action, v.first_bad) == ("rollback", 5)
  assert v.msg.startswith("3 consecutive steps with non-finite loss/gradients (steps 5..7, 5 in "
                          "this run) > guards.max_nonfinite=2")
  assert g.nonfinite_total == 5
  g.reset()
  assert g.healthy and g.check(8, _m(1)) is None           # counting starts again


def test_collapse_thresholds_policies_and_messages(capsys):
  g = _guards(min_target_var=0.1, min_pred_var=0.05, collapse_after=5)
  assert g.check(4, _m(target_var=0.01, pred_var=0.01)) is None   # before collapse_after
  v = g.check(5, _m(target_var=0.0123, pred_var=0.5))
  assert (v.action, v.first_bad) == ("stop", 5)
  assert v.msg == ("representation collapse at step 5 (since step 5): target_var=0.0123 < "
                   "guards.min_target_var=0.1")
  v = g.check(6, _m(target_var=0.5, pred_var=0.01))
  assert v.msg.endswith("(since step 5): pred_var=0.01 < guards.min_pred_var=0.05")
  assert g.check(7, _m()) is None and g.healthy
  assert g.check(8, _m(1, target_var=float("nan"))) is None        # skipped steps say nothing

  w = _guards(min_target_var=0.1, collapse_after=0, collapse_policy="warn")
  assert [w.check(s, _m(target_var=0.02)) for s in (1, 2, 3)] == [None] * 3
  assert w.healthy   # warn keeps saving checkpoints
  err = capsys.readouterr().err
  assert err.count("warning: representation collapse at step 1 (since step 1): target_var=0.02 "
                   "< guards.min_target_var=0.1; training continues") == 1 and err.count("\n") == 1
  for bad in (dict(collapse_policy="ignore"), dict(nonfinite_policy="warn"),
              dict(max_nonfinite=-1)):
    with pytest.raises(config_lib.ConfigError, match=f"guards.{next(iter(bad))}="):
      _guards(**bad)


# ------------------------------------------------------------- in the trainer (8 devices)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  return text_setup(str(tmp_path_factory.mktemp("text_setup")))


def _dataset(poison=(), remap=lambda p: p, used=None):
  """build_dataset wrapper: batches at data positions in `poison` get token ids past the
  vocabulary (their embeddings gather NaN, so loss and gradients are NaN); position p reads
  the real batch remap(p); positions read are appended to `used`."""
  orig = text_data.build_dataset

  def build_dataset(cfg, workdir, *, start_step, process_index, process_count):
    it, want, p = None, None, start_step
    while True:
      q = remap(p)
      if q != want:
        it = iter(orig(cfg, workdir, start_step=q, process_index=process_index,
                       process_count=process_count))
      b = next(it)
      want = q + 1
      if used is not None:
        used.append(p)
      if p in poison:
        b = {**b, "student": np.full_like(b["student"], 10 ** 6)}
      yield b
      p += 1
  return build_dataset


def _rows(workdir):
  return metrics.read(workdir)


def _steps(workdir):
  return sorted(ocp.step.checkpoint_steps(os.path.join(workdir, "checkpoints")))


def test_nan_batches_are_skipped_counted_and_stop_the_run(setup, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(text_data, "build_dataset", _dataset(poison={4, 5, 6}))
  work = str(tmp_path / "run")
  args = text_args(setup, total_steps=10, checkpoint_every=2, **{"guards.max_nonfinite": 2})
  with pytest.raises(SystemExit) as e:
    train.run(parse(args), work)
  assert str(e.value) == ("error: 3 consecutive steps with non-finite loss/gradients (steps "
                          "5..7, 3 in this run) > guards.max_nonfinite=2; lower the lr or check "
                          "the data")
  rows = {r["step"]: r for r in _rows(work)}
  assert sorted(rows) == list(range(1, 8))
  assert [rows[s]["nonfinite"] for s in range(1, 8)] == [0, 0, 0, 0, 1, 1, 1]
  assert [rows[s]["nonfinite_total"] for s in range(1, 8)] == [0, 0, 0, 0, 1, 2, 3]
  assert all(np.isnan(rows[s]["loss"]) for s in (5, 6, 7))
  assert all(np.isfinite(rows[s]["loss"]) for s in (1, 2, 3, 4))
  # What the skip protects, as the trainer logs it: the student's norm and its distance to the
  # teacher after each skipped step are step 4's to the bit (a NaN update would make them NaN,
  # an update of one of the two would move the distance), while steps 2..4 moved both.
  for key in ("param_norm", "teacher_dist"):
    assert [rows[s][key] for s in (5, 6, 7)] == [rows[4][key]] * 3, key
    assert len({rows[s][key] for s in (2, 3, 4)}) == 3, key
  # During the incident no checkpoint was written: the kept ones predate it.
  err = capsys.readouterr().err
  assert "warning: not saving step 6 during a non-finite / collapse incident" in err
  assert _steps(work) == [2, 4]


def test_nan_batches_roll_back_to_the_last_good_checkpoint_past_the_bad_data(setup, tmp_path,
                                                                             monkeypatch, capsys):
  args = text_args(setup, total_steps=10, checkpoint_every=2,
                   **{"guards.max_nonfinite": 2, "guards.nonfinite_policy": "rollback"})
  used = []
  monkeypatch.setattr(text_data, "build_dataset", _dataset(poison={4, 5, 6}, used=used))
  work = str(tmp_path / "rollback")
  train.run(parse(args), work)
  err = capsys.readouterr().err
  assert ("> guards.max_nonfinite=2; lower the lr or check the data; rolled back to checkpoint "
          "step 4 (rollback 1/3, deleted later checkpoints []); data continues at position 8, "
          "batches 4..7 are not used again") in err
  # Steps 1-4 read batches 0-3; 5-7 the poisoned 4-6; 8 read 7 before the rollback; after it,
  # steps 5-10 read 8-13: the stream never goes back.
  assert used == list(range(14))
  state, meta = load_state(work)
  assert (int(state.step), meta["data_position"]) == (10, 14)

  # Reference without incident: steps 1-4 on batches 0-3, steps 5-10 on batches 8-13.
  monkeypatch.setattr(text_data, "build_dataset", _dataset(remap=lambda p: p if p < 4 else p + 4))
  ref = str(tmp_path / "ref")
  train.run(parse(args), ref)
  ref_state, _ = load_state(ref)
  assert_states_equal(ref_state, state)
  want = {r["step"]: r["loss"] for r in _rows(ref)}
  after = _rows(work)[-6:]
  assert [r["step"] for r in after] == list(range(5, 11))
  assert all(r["loss"] == want[r["step"]] for r in after)
  assert _steps(work) == [2, 4, 6, 8, 10]


def _collapsed_teacher(monkeypatch):
  """The teacher's encoder starts at zero and tau = 1 keeps it there: every target is the
  LayerNorm of a zero vector, so target_var is ~sqrt(1e-6)."""
  orig = build_lib.build

  def build(cfg, **kw):
    built = orig(cfg, **kw)
    init = built.init

    def zero_teacher(seed):
      s = init(seed)
      return s.replace(teacher=jax.tree_util.tree_map(lambda x: x * 0, s.teacher))
    built.init = zero_teacher
    return built
  monkeypatch.setattr(build_lib, "build", build)


@pytest.mark.parametrize("policy", ["warn", "stop", "rollback"])
def test_collapsed_teacher_triggers_the_collapse_policy(setup, tmp_path, monkeypatch, capsys,
                                                        policy):
  _collapsed_teacher(monkeypatch)
  args = text_args(setup, total_steps=5, checkpoint_every=2,
                   **{"teacher.tau_start": 1.0, "teacher.tau_end": 1.0,
                      "guards.min_target_var": 0.1, "guards.collapse_after": 3,
                      "guards.collapse_policy": policy, "guards.max_rollbacks": 1})
  work = str(tmp_path / policy)
  msg = ("representation collapse at step 3 (since step 3): target_var=0.001 < "
         "guards.min_target_var=0.1")
  if policy == "warn":
    train.run(parse(args), work)
    err = capsys.readouterr().err
    assert err.count(f"warning: {msg}; training continues (guards.collapse_policy=warn)") == 1
    assert _steps(work) == [2, 4, 5]
  else:
    with pytest.raises(SystemExit) as e:
      train.run(parse(args), work)
    if policy == "stop":
      assert str(e.value) == f"error: {msg}"
    else:  # rolled back to step 2 once, collapsed again at step 3, then stopped
      assert "rolled back to checkpoint step 2 (rollback 1/1" in capsys.readouterr().err
      assert str(e.value) == f"error: {msg}; not rolling back again (guards.max_rollbacks=1)"
    assert _steps(work) == [2]
  rows = _rows(work)
  # Collapsed from step 1 on, but the guard waits for guards.collapse_after (3).
  assert rows[0]["step"] == 1 and all(abs(r["target_var"] - 1e-3) < 1e-6 for r in rows)


# ------------------------------------------------------------- dimensional collapse (rank)

# rank_target / rank_pred logged every 10 steps (means over the window) by real runs of the
# runlocal recipes (tiny, D = 64; measured once): text (configs/text.py:variant=tiny,runlocal on
# data/text/kjv.txt, a healthy run) and audio (configs/audio.py:variant=tiny,runlocal on the
# English prompts) as the recipe was before its fix: the teacher read the student's positional
# conv, the collapse of docs/evaluation.md. target_var stayed ~0.95 in audio.
TEXT_RANK_TARGET = [50.0, 50.0, 49.7, 49.3, 49.0, 48.9, 48.8, 48.8, 48.7, 48.5, 48.5, 48.3,
                    48.0, 48.0, 47.5, 47.5, 47.3, 47.1, 46.9, 46.5, 46.3, 46.1, 46.0, 45.8,
                    45.7, 45.7, 45.5, 45.5, 45.5, 45.6]
TEXT_RANK_PRED = [46.4, 45.6, 42.6, 38.8, 35.7, 32.4, 31.2, 30.2, 29.3, 28.9, 27.9, 26.4, 23.9,
                  19.7, 15.1, 14.4, 15.5, 15.8, 16.0, 15.4, 14.6, 13.7, 12.9, 12.5, 12.2, 11.9,
                  11.7, 11.7, 11.6, 11.6]
AUDIO_RANK_TARGET = [44.2, 36.0, 27.0, 18.9, 15.5, 12.6, 9.9, 8.3, 8.8, 8.1, 7.5, 7.7, 7.3, 6.9,
                     7.0, 6.9, 7.2, 8.1, 7.1, 6.8, 5.8, 5.6, 5.6, 5.9, 6.1, 6.7, 7.0, 7.3, 7.9,
                     7.4]
# vision (configs/vision.py:variant=tiny,runlocal, data/vision/photos; 280 steps): the
# student's predictions span ~2 directions while its targets keep ~15.
VISION_RANK_TARGET = [35.0, 34.4, 33.4, 30.9, 30.6, 27.6, 27.0, 24.6, 22.2, 20.0, 20.3, 18.7,
                      19.1, 16.1, 18.1, 16.7, 16.2, 14.9, 16.1, 14.3, 16.0, 15.3, 14.6, 14.7,
                      15.3, 14.8, 15.2, 14.3]
VISION_RANK_PRED = [7.0, 4.1, 2.8, 1.7, 1.8, 2.0, 2.0, 2.0, 1.8, 2.1, 2.3, 2.3, 2.3, 2.2, 2.2,
                    2.2, 2.2, 2.1, 2.2, 2.2, 2.2, 2.2, 2.2, 2.2, 2.2, 2.2, 2.2, 2.2]
# audio on the 5-language pretraining set (--config.data.path='data/eval/lang_pretrain/*.wav',
# tools/eval_evidence.sh audio): the rank computed every 10th step (the default); its features
# probe below random init on the held-out language ID (linear 0.394 vs 0.471, docs/evaluation.md).
LANG_RANK_TARGET = [47.3, 39.6, 31.2, 22.9, 14.0, 9.5, 7.6, 7.2, 6.8, 5.9, 5.3, 5.0, 4.9, 4.7, 5.0,
                    4.8, 4.7, 4.8, 5.4, 5.3, 5.4, 4.8, 4.5, 4.3, 4.3, 4.2, 4.7, 5.0, 5.4, 5.2]
# The same run with the fixed recipe (the teacher's own EMA of the positional conv,
# configs/audio.py runlocal): linear 0.609 +- 0.006 vs random init 0.471 +- 0.012.
LANG_FIXED_RANK_TARGET = [47.3, 42.7, 38.2, 32.7, 29.9, 24.6, 24.3, 25.3, 23.7, 20.0, 19.1, 18.2,
                          16.6, 16.5, 16.3, 14.7, 15.6, 15.5, 14.3, 13.4, 15.4, 14.4, 14.6, 13.6,
                          14.5, 14.9, 15.4, 14.5, 14.9, 14.0]


def _rank_m(target, pred=50.0):
  return {**_m(), "rank_target": target, "rank_pred": pred}


def test_rank_guard_policies_floors_and_messages(capsys):
  g = _guards(min_target_rank=10.0, min_pred_rank=3.0, rank_after=5, rank_policy="stop")
  assert g.check(4, _rank_m(1.5, 1.0)) is None and g.healthy        # before rank_after
  v = g.check(5, _rank_m(1.9876, 20.0))
  assert (v.action, v.first_bad) == ("stop", 5)
  assert v.msg == ("dimensional collapse at step 5 (since step 5): rank_target=1.988 < "
                   "guards.min_target_rank=10.0")
  assert not g.healthy                                               # checkpoints held back
  assert g.check(6, _rank_m(float("nan"), float("nan"))) is None     # not computed this step
  v = g.check(7, _rank_m(12.0, 2.5))
  assert v.msg == ("dimensional collapse at step 7 (since step 5): rank_pred=2.5 < "
                   "guards.min_pred_rank=3.0")
  assert g.check(8, _rank_m(12.0, 3.5)) is None and g.healthy
  # a skipped (non-finite) step says nothing; the collapse guard still works alongside
  assert g.check(9, {**_rank_m(0.5), "nonfinite": 1}) is None
  r = _guards(min_target_rank=10.0, rank_after=0, rank_policy="rollback", min_target_var=0.1,
              collapse_after=0)
  v = r.check(3, {**_rank_m(4.0), "target_var": 0.05})
  assert (v.action, v.first_bad) == ("stop", 3)    # the collapse verdict (collapse_policy) first
  v = r.check(4, _rank_m(4.0))
  assert (v.action, v.first_bad) == ("rollback", 3)
  w = _guards(min_target_rank=10.0, rank_after=0, rank_policy="warn")
  assert [w.check(s, _rank_m(3.0)) for s in (1, 2, 3)] == [None] * 3 and w.healthy
  err = capsys.readouterr().err
  assert err == ("warning: dimensional collapse at step 1 (since step 1): rank_target=3 < "
                 "guards.min_target_rank=10.0; training continues (guards.rank_policy=warn)\n")
  off = _guards(min_target_rank=0.0)
  assert off.check(10, _rank_m(1.0, 1.0)) is None and off.healthy
  for bad in (dict(rank_policy="ignore"), dict(min_target_rank=-1.0), dict(rank_after=-5)):
    with pytest.raises(config_lib.ConfigError, match=f"guards.{next(iter(bad))}="):
      _guards(**bad)


def test_default_rank_guard_is_quiet_on_runlocal_text_vision_and_fires_on_audio(capsys):
  """The default guards (d2v_jax/recipe.py) on the ranks of the real runlocal runs: the step
  computes them every 10th step (1, 11, 21, ...; NaN between), here the logged mean of each
  10-step window. Quiet on text, vision and the fixed audio recipe; fires on the collapsed
  audio runs (the recipe before its fix)."""
  cfg = config_lib.load_file("configs/text.py:variant=tiny,runlocal")
  assert (cfg.guards.min_target_rank, cfg.guards.min_pred_rank, cfg.guards.rank_window,
          cfg.guards.rank_after, cfg.guards.rank_policy, cfg.eval.step_rank_every) == (
              8.0, 0.0, 5, 100, "warn", 10)
  nan = float("nan")

  def replay(guards, targets, preds):
    for i, (t, p) in enumerate(zip(targets, preds)):
      for s in range(10 * i + 1, 10 * i + 11):
        m = _rank_m(t, p) if s % 10 == 1 else _rank_m(nan, nan)
        assert guards.check(s, m) is None   # warn: training continues
    return guards

  for name, t, p in (("text", TEXT_RANK_TARGET, TEXT_RANK_PRED),
                     ("vision", VISION_RANK_TARGET, VISION_RANK_PRED),
                     ("audio", LANG_FIXED_RANK_TARGET, LANG_FIXED_RANK_TARGET)):
    g = replay(metrics.Guards(config_lib.load_file(f"configs/{name}.py:variant=tiny,runlocal").guards),
               t, p)
    assert g.healthy and g.rank_since is None, name
  assert min(TEXT_RANK_TARGET) / cfg.guards.min_target_rank > 5.5      # margins
  assert min(VISION_RANK_TARGET) / cfg.guards.min_target_rank > 1.75
  assert min(LANG_FIXED_RANK_TARGET) / cfg.guards.min_target_rank > 1.6
  assert capsys.readouterr().err == ""
  audio = replay(metrics.Guards(config_lib.load_file("configs/audio.py:variant=tiny,runlocal").guards),
                 AUDIO_RANK_TARGET, AUDIO_RANK_TARGET)
  # the mean of the ranks at steps 81..121 (8.8 8.1 7.5 7.7 7.3) is 7.88 < 8
  assert audio.healthy   # warn keeps saving checkpoints
  err = capsys.readouterr().err.splitlines()
  assert err[0] == (
      "warning: dimensional collapse at step 121 (since step 121): rank_target=7.88 (mean of "
      "the last 5 ranks) < guards.min_target_rank=8.0; training continues "
      "(guards.rank_policy=warn)")
  assert audio.rank_since is not None   # still collapsed at step 300
  lang = replay(metrics.Guards(config_lib.load_file("configs/audio.py:variant=tiny,runlocal").guards),
                LANG_RANK_TARGET, LANG_RANK_TARGET)
  # ranks at steps 61..101: 7.6 7.2 6.8 5.9 5.3, mean 6.56; below 8 from then to the end
  assert lang.rank_since == 101
  assert capsys.readouterr().err == (
      "warning: dimensional collapse at step 101 (since step 101): rank_target=6.56 (mean of "
      "the last 5 ranks) < guards.min_target_rank=8.0; training continues "
      "(guards.rank_policy=warn)\n")


def _targets_on_two_directions(monkeypatch):
  """Dimensional collapse forced: every target is projected onto 2 fixed directions of the
  64 channels. target_var (per-channel std) stays far from 0; only the rank sees it."""
  import jax.numpy as jnp

  from d2v_jax import targets
  orig = targets.targets_from_config
  u, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(64, 2)))
  proj = jnp.asarray(u @ u.T * 8.0, jnp.float32)   # x8: per-channel std ~ that of the targets

  def two_dims(layers, valid, tcfg):
    return orig(layers, valid, tcfg) @ proj
  monkeypatch.setattr(targets, "targets_from_config", two_dims)


def test_forced_dimensional_collapse_triggers_the_rank_policy(setup, tmp_path, monkeypatch,
                                                             capsys):
  _targets_on_two_directions(monkeypatch)
  args = text_args(setup, total_steps=5, checkpoint_every=2,
                   **{"guards.rank_after": 3, "guards.rank_policy": "rollback",
                      "guards.max_rollbacks": 1, "eval.step_rank_every": 1})
  work = str(tmp_path / "rank")
  with pytest.raises(SystemExit) as e:
    train.run(parse(args), work)
  # rolled back to step 2 once, collapsed again at step 3, then stopped
  assert "rolled back to checkpoint step 2 (rollback 1/1" in capsys.readouterr().err
  msg = str(e.value)
  assert msg.startswith("error: dimensional collapse at step 3 (since step 3): rank_target=")
  assert msg.endswith(" < guards.min_target_rank=8.0; not rolling back again "
                      "(guards.max_rollbacks=1)")
  assert _steps(work) == [2]
  rows = _rows(work)
  assert all(1.0 <= r["rank_target"] <= 2.0 + 1e-3 for r in rows)   # 2 directions: rank <= 2
  assert all(r["rank_pred"] > 2.0 for r in rows)                     # the student's, not forced
  assert all(r["target_var"] > 0.1 for r in rows)                    # the var guard is blind
