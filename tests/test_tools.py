"""tools/v1_vs_v2.py (the equal-wall-time table of docs/evaluation.md) on hand-made run
directories: which checkpoints fall within W / 3 and W, the lines it prints, its errors.
(tools/probe_curve.py is tested on a real run in tests/test_fourth_modality.py; tools/mutants.py
in tests/test_mutants.py.)"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "v1_vs_v2.py")


def _tool():
  spec = importlib.util.spec_from_file_location("v1_vs_v2", TOOL)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _run(root, name: str, elapsed: dict, students: dict, init=None, ckpts=()) -> str:
  """A run directory: metrics.jsonl (elapsed_s per logged step, and a row without it),
  probe/curve_digits.json (student rows; an init row), checkpoints/<step>/."""
  run = root / name
  os.makedirs(run / "probe")
  with open(run / "metrics.jsonl", "w") as f:
    f.write(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    for step, t in elapsed.items():
      f.write(json.dumps({"step": step, "loss": 0.5, "elapsed_s": t}) + "\n")
  row = lambda step, w, acc, rank: {"step": step, "weights": w, "linear_acc": acc,
                                    "linear_acc_std": 0.01, "effective_rank": rank}
  rows = ([row(0, "init", init, 3.8)] if init is not None else []) + [
      row(s, "student", a, 5.0) for s, a in students.items()] + [
      row(s, "teacher", 0.0, 1.0) for s in students]
  json.dump({"rows": rows}, open(run / "probe" / "curve_digits.json", "w"))
  for s in ckpts:
    os.makedirs(run / "checkpoints" / str(s))
  os.makedirs(run / "checkpoints" / "tmp_not_a_step", exist_ok=True)
  return str(run)


@pytest.fixture
def runs(tmp_path):
  # v1: W = 300 s (its last logged step), final student 0.44
  v1 = _run(tmp_path, "v1", {100: 100.0, 200: 200.0, 300: 300.0}, {300: 0.44}, init=0.30)
  # v2 long run: checkpoints every 100 steps, 0.5 s per step
  steps = (100, 200, 300, 600, 700)
  v2 = _run(tmp_path, "v2", {s: s / 2 for s in steps},
            {100: 0.35, 200: 0.40, 300: 0.45, 600: 0.50, 700: 0.52}, ckpts=steps)
  short = _run(tmp_path, "short", {100: 47.0, 200: 95.0}, {200: 0.43}, ckpts=(200,))
  return v1, v2, short, str(tmp_path / "digits")


def test_table_lines(runs):
  v1, v2, short, data = runs
  assert _tool().table(v1, v2, data, short) == [
      "random init: 0.300 +- 0.010 (rank 3.8)",
      "v1 step 300 at 300 s: 0.440 +- 0.010 (rank 5.0)",
      # W / 3 = 100 s: step 200 took exactly 100 s (within), 300 took 150 s
      "v2 checkpoint within W/3 (100 s): step 200 at 100 s: 0.400 +- 0.010 (rank 5.0)",
      "v2 checkpoint within W (300 s): step 600 at 300 s: 0.500 +- 0.010 (rank 5.0)",
      "v2 with a W/3 schedule: step 200 at 95 s: 0.430 +- 0.010 (rank 5.0); reaches v1's final "
      "accuracy: no",
      "v2 (long run) first reaches v1's final accuracy: step 300 at 150 s = 0.50 W"]


def test_third_steps_and_the_command_line(runs):
  v1, v2, short, data = runs
  assert _tool().third_steps(v1, v2) == 200
  run = lambda *a: subprocess.run([sys.executable, TOOL, *a], capture_output=True, text=True)
  r = run(v1, v2, "--third-steps")
  assert (r.returncode, r.stdout) == (0, "200\n")
  r = run(v1, v2, data)
  assert r.returncode == 0 and r.stdout.splitlines()[-1].endswith("step 300 at 150 s = 0.50 W")
  r = run(v1, v2)
  assert r.returncode == 2 and "PROBE_DATA is required for the table" in r.stderr


def test_errors_name_the_run(runs, tmp_path):
  v1, v2, short, data = runs
  tool = _tool()
  slow = _run(tmp_path, "slow", {500: 400.0}, {500: 0.5}, ckpts=(500,))
  with pytest.raises(SystemExit, match=f"{slow} has no checkpoint within a third of {v1}'s wall time"):
    tool.third_steps(v1, slow)
  old = tmp_path / "old"
  os.makedirs(old)
  (old / "metrics.jsonl").write_text(json.dumps({"step": 5, "loss": 1.0}) + "\n")
  with pytest.raises(SystemExit, match="metrics.jsonl has no elapsed_s"):
    tool.third_steps(str(old), v2)
  never = _run(tmp_path, "never", {100: 50.0}, {100: 0.1}, ckpts=(100,))
  assert tool.table(v1, never, data)[-1] == ("v2 (long run) first reaches v1's final accuracy: "
                                            "not within its run")


def test_scaling_summary_row(tmp_path):
  """tools/scaling_summary.py: loss of the last log window at 1/4, 1/2, 3/4 and all of the steps,
  the run's lr and tau, and each probe's margin over the random init in sd."""
  spec = importlib.util.spec_from_file_location("scaling_summary",
                                                os.path.join(ROOT, "tools", "scaling_summary.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  run = tmp_path / "scale_text_4B"
  os.makedirs(run / "probe")
  json.dump({"batch_size": 64, "total_steps": 40, "optim": {"lr": 1e-3},
             "teacher": {"tau_start": 0.996006, "tau_end": 0.9996}}, open(run / "config.json", "w"))
  with open(run / "metrics.jsonl", "w") as f:
    for step in range(5, 41, 5):
      f.write(json.dumps({"step": step, "loss": step / 10}) + "\n")
    f.write(json.dumps({"step": 40, "rank_student": 3.0}) + "\n")     # an eval row: no loss
  probe = lambda acc, std, rank: {"linear_acc": acc, "linear_acc_std": std, "effective_rank": rank}
  json.dump({"rows": [probe(0.44, 0.01, 43.2), probe(0.40, 0.02, 53.0)]},
            open(run / "probe" / "kjv_group_student+random_layer2.json", "w"))
  assert mod.summarise(str(run)) == (
      "| scale_text_4B | 64 x 40 | 0.001 | 0.99601 -> 0.9996 | 1.000 / 2.000 / 3.000 / 4.000 | "
      "kjv_group 0.440 +- 0.010 (random 0.400, +2.0 sd; rank 43) |")
