"""A fourth modality defined only under tests/ (tests/sensor_modality: a model, a data and a
config file; modality = "sensor_modality") trains, checkpoints, resumes bitwise, probes
(linear / k-NN against its random init), evaluates during training and compiles ahead of
time through the public entry points, with no line of d2v_jax/ naming it: the modality
contract of d2v_jax/modality.py is complete. Exporting it to Hugging Face (it has no HF map)
is one clear error line."""

import json
import os

import numpy as np
import pytest

from d2v_jax import checkpoint, compile as compile_cli, export as export_lib, metrics, train
from d2v_jax.probe import cli as probe_cli
from reliability_utils import ROOT, assert_states_equal, load_state

CONFIG = "tests/sensor_modality/config.py"
FREQS = (1.0, 2.5, 5.0)   # cycles per 64-sample window: the three classes of the probe set
# 100 windows per class: with 12, a random init's accuracy alone wandered 0.28..0.40 between
# draws of the probe set (chance 0.33).
PROBE_PER_CLASS = 100


def _recording(rng, freq: float, samples: int) -> np.ndarray:
  """3 channels: phase-shifted sines at `freq` cycles / 64 samples, plus noise."""
  t = np.arange(samples)[:, None]
  phase = rng.uniform(0, 2 * np.pi, (1, 3))
  return (np.sin(2 * np.pi * freq * t / 64 + phase) + 0.3 * rng.normal(size=(samples, 3))).astype(np.float32)


@pytest.fixture(scope="module")
def sensor_data(tmp_path_factory):
  root = tmp_path_factory.mktemp("sensor")
  rng = np.random.default_rng(0)
  os.makedirs(root / "train")
  for i in range(6):   # 6 recordings x 16 windows
    np.save(root / "train" / f"rec{i}.npy", _recording(rng, FREQS[i % 3], 1024))
  for c, f in enumerate(FREQS):
    os.makedirs(root / "probe" / f"class{c}")
    for i in range(PROBE_PER_CLASS):
      np.save(root / "probe" / f"class{c}" / f"w{i}.npy", _recording(rng, f, 64))
  return str(root / "train"), str(root / "probe")


def _train(workdir: str, data: str, *extra: str) -> None:
  cwd = os.getcwd()
  os.chdir(ROOT)   # the config path is relative to the repository root
  try:
    train.main(["python -m d2v_jax.train", "--config", CONFIG, "--workdir", workdir,
                f"--config.data.path={data}", *extra])
  finally:
    os.chdir(cwd)


@pytest.fixture(scope="module")
def straight(sensor_data, tmp_path_factory):
  """6 steps in one go, with the in-training probe every 3 steps."""
  train_dir, probe_dir = sensor_data
  work = str(tmp_path_factory.mktemp("sensor_run") / "run")
  _train(work, train_dir, "--config.eval.probe_every=3", f"--config.eval.probe_data={probe_dir}")
  return work


# Long enough to learn: 600 steps at a constant lr 3e-3, batch 16 (the data2vec loss falls
# 2.1 -> 0.33 as the student learns to predict masked patches from their neighbours, mostly
# between steps 200 and 500); checkpoints at 300 and 600 for tools/probe_curve.py.
LEARN = ("--config.total_steps=600", "--config.optim.schedule=constant", "--config.optim.lr=3e-3",
         "--config.batch_size=16", "--config.log_every=300", "--config.checkpoint_every=300")


@pytest.fixture(scope="module")
def learned(sensor_data, tmp_path_factory):
  train_dir, _ = sensor_data
  work = str(tmp_path_factory.mktemp("sensor_learned") / "run")
  _train(work, train_dir, *LEARN)
  return work


@pytest.fixture(scope="module")
def probed(learned, sensor_data):
  """`python -m d2v_jax.probe --baseline --repeats 3` of the learned run."""
  return probe_cli.probe(learned, sensor_data[1], baseline=True, repeats=3)


def test_trains_checkpoints_and_evaluates_during_training(straight):
  rows = metrics.read(straight)
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == 6 and all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert checkpoint.read_meta(straight)[0] == 6
  cfg = json.load(open(os.path.join(straight, "config.json")))
  assert cfg["modality"] == "sensor_modality" and cfg["model"]["patch"] == 4
  probes = [r for r in rows if "probe_linear_acc" in r]
  assert [r["step"] for r in probes] == [3, 6]
  assert all(0.0 <= r["probe_linear_acc"] <= 1.0 and r["probe_chance"] == pytest.approx(1 / 3, abs=0.05)
             for r in probes)


def test_resume_is_bitwise(straight, sensor_data, tmp_path):
  """Stopped after 3 steps and resumed to 6 by rerunning the command: the same state, bit for bit."""
  train_dir, _ = sensor_data
  work = str(tmp_path / "run")
  _train(work, train_dir, "--config.total_steps=3")
  assert checkpoint.read_meta(work)[0] == 3
  # total_steps 3 -> 6 is a change of the run's config: resuming says so (d2v_jax/drift.py)
  _train(work, train_dir, "--config.resume_allow_changes=total_steps")
  a, meta_a = load_state(straight)
  b, meta_b = load_state(work)
  assert meta_a["step"] == meta_b["step"] == 6 and meta_b["data_position"] == 6
  assert_states_equal(a, b)


def test_probe_against_random_init(probed):
  """The frequency of held-out windows (3 classes, random phases and noise) from mean-pooled
  final-layer features: a random init's features are near-linear in the signal, and a
  sine's mean over a window is ~0 whatever its frequency (measured 0.32, chance 0.33); the
  student trained 600 steps represents it (measured 0.49 +- 0.03 vs 0.32 +- 0.03 over 3
  splits). Asserted: the student beats its random init by 0.1, a frozen (= random init) or
  collapsed (constant features: chance) model fails."""
  res = probed
  assert res["modality"] == "sensor_modality" and res["classes"] == ["class0", "class1", "class2"]
  assert res["class_sizes"] == [PROBE_PER_CLASS] * 3 and res["num_layers"] == 2 and res["step"] == 600
  assert [r["weights"] for r in res["rows"]] == ["student", "random-init"]
  student, init = res["rows"]
  for r in res["rows"]:
    assert 1.0 < r["effective_rank"] <= 32.0
    assert r["chance"] == pytest.approx(1 / 3, abs=0.01)
  print(f"sensor probe: student {student['linear_acc']:.3f} +- {student['linear_acc_std']:.3f}, "
        f"random init {init['linear_acc']:.3f} +- {init['linear_acc_std']:.3f}")
  assert init["linear_acc"] < 0.45
  assert student["linear_acc"] > init["linear_acc"] + 0.1


def test_probe_curve_tool(learned, sensor_data, probed, tmp_path):
  """tools/probe_curve.py on the learned run: rows for the init and the student and teacher of
  each checkpoint (300, 600); its init row is the probe CLI's random init and its step-600
  student row the CLI's student, to the last digit (same features, splits and probes)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("probe_curve", os.path.join(ROOT, "tools", "probe_curve.py"))
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  out = tmp_path / "curve.json"
  tool.main(["--workdir", learned, "--data", sensor_data[1], "--repeats", "3", "--out", str(out)])
  curve = json.load(open(out))
  rows = {(r["step"], r["weights"]): r for r in curve["rows"]}
  assert list(rows) == [(0, "init"), (300, "student"), (300, "teacher"), (600, "student"),
                        (600, "teacher")]
  assert curve["layer"] == 2 and curve["classes"] == ["class0", "class1", "class2"]
  student, init = probed["rows"]
  for mine, theirs in ((rows[0, "init"], init), (rows[600, "student"], student)):
    for key in ("linear_acc", "linear_acc_std", "knn_acc", "chance", "effective_rank"):
      assert mine[key] == pytest.approx(theirs[key], rel=1e-9), key
  # the teacher (tau ~0.999) lags the student: its own row, not a copy
  assert rows[600, "teacher"]["effective_rank"] != rows[600, "student"]["effective_rank"]


def test_aot_compile_for_a_tpu_topology(capsys):
  """The trainer's step compiled ahead of time (TPU with libtpu, else 4 fake CPU devices):
  memory and FLOPs, the embedder's counted from its traced forward (d2v_jax/flops.py)."""
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    code = compile_cli.main(["python -m d2v_jax.compile", "--config", CONFIG, "--topology", "v5e-4",
                             "--batch_per_device=2", "--config.data.path=unused"])
  finally:
    os.chdir(cwd)
  out = capsys.readouterr().out
  assert code == compile_cli.EXIT_OK, out
  assert "fits" in out and "analytic" in out
  analytic = float(out.split("analytic ")[1].split(" global")[0])
  assert analytic > 0


def test_export_without_an_hf_map_is_one_line(straight, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    export_lib.main(["--workdir", straight, "--out", str(tmp_path / "hf")])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and err == [
      "error: modality 'sensor_modality' has no Hugging Face map (no hf module): it cannot "
      "export to or import from Hugging Face"]
  assert not os.path.exists(tmp_path / "hf")


def test_the_package_never_names_it():
  for dirpath, _, names in os.walk(os.path.join(ROOT, "d2v_jax")):
    for name in names:
      if name.endswith(".py"):
        assert "sensor" not in open(os.path.join(dirpath, name)).read(), name
