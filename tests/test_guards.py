"""Run guards: non-finite steps are skipped and counted, and the policy (stop / rollback) fires
after guards.max_nonfinite in a row; a collapsed teacher triggers guards.collapse_policy
(warn / stop / rollback) with the numbers in the message."""

import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from d2v_jax import build as build_lib, config as config_lib, metrics, train
from d2v_jax.data import text as text_data
from reliability_utils import assert_states_equal, load_state, parse, text_args, text_setup


def _guards(**kw):
  g = ml_collections.ConfigDict(dict(min_target_var=0.0, min_pred_var=0.0, collapse_after=5,
                                     collapse_policy="stop", max_nonfinite=2,
                                     nonfinite_policy="stop", max_rollbacks=3))
  g.update(kw)
  return metrics.Guards(g)


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
