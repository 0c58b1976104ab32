"""A fourth modality defined only under tests/ (tests/sensor_modality: a model, a data and a
config file; modality = "sensor_modality") trains, checkpoints, resumes bitwise, probes
(linear / k-NN against its random init), evaluates during training and compiles ahead of
time through the public entry points, with no line of d2v_jax/ naming it: the modality
contract of d2v_jax/modality.py is complete. Exporting it to Hugging Face (it has no HF map)
is one clear error line."""

import json
import os

import jax
import numpy as np
import pytest

from d2v_jax import checkpoint, compile as compile_cli, export as export_lib, metrics, train
from d2v_jax.probe import cli as probe_cli
from reliability_utils import ROOT, assert_states_equal, load_state

CONFIG = "tests/sensor_modality/config.py"
FREQS = (1.0, 2.5, 5.0)   # cycles per 64-sample window: the three classes of the probe set


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
    for i in range(12):
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
  _train(work, train_dir)
  a, meta_a = load_state(straight)
  b, meta_b = load_state(work)
  assert meta_a["step"] == meta_b["step"] == 6 and meta_b["data_position"] == 6
  assert_states_equal(a, b)


def test_probe_against_random_init(straight, sensor_data):
  _, probe_dir = sensor_data
  res = probe_cli.probe(straight, probe_dir, baseline=True, repeats=2, k=5)
  assert res["modality"] == "sensor_modality" and res["classes"] == ["class0", "class1", "class2"]
  assert res["class_sizes"] == [12, 12, 12] and res["num_layers"] == 2
  assert [r["weights"] for r in res["rows"]] == ["student", "random-init"]
  for r in res["rows"]:
    assert 0.0 <= r["linear_acc"] <= 1.0 and 1.0 < r["effective_rank"] <= 32.0
    assert r["chance"] == pytest.approx(1 / 3, abs=0.05)


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
