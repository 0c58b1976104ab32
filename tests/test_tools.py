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
