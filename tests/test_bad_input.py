"""Bad input gets one clear message, and nothing in the existing run directory changes: every
file of the run (checkpoints, metrics, config.json, tokenizer) hashes the same afterwards."""

import json
import os
import shutil

import pytest

from d2v_jax import checkpoint, config as config_lib, export as export_lib, train
from reliability_utils import (audio_args, parse, text_args, text_setup, tree_hashes, vision_args,
                               write_images, write_wavs)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  return text_setup(str(tmp_path_factory.mktemp("text_setup")))


@pytest.fixture(scope="module")
def run_dir(setup, tmp_path_factory):
  """A finished 2-step run (checkpoint 2); the tests relaunch on it with bad input."""
  work = str(tmp_path_factory.mktemp("run"))
  train.run(parse(text_args(setup, total_steps=2, checkpoint_every=2)), work)
  assert os.path.isdir(os.path.join(work, "checkpoints", "2"))
  return work


class Unchanged:
  """Asserts that no file under the given directories was added, removed or changed."""

  def __init__(self, *dirs):
    self.dirs = dirs

  def __enter__(self):
    self.before = [tree_hashes(d) for d in self.dirs]
    return self

  def __exit__(self, *exc):
    assert [tree_hashes(d) for d in self.dirs] == self.before
    return False


def _empty(path):
  open(path, "w").close()
  return path


@pytest.mark.parametrize("override, message", [
    ({"data.mask_prob": 1.5}, "data.mask_prob=1.5 must be in [0, 1]"),
    ({"target.top_k": 5}, "target.top_k=5 must be in [1, model.encoder.num_layers=2]"),
    ({"data.block_size": 600},
     "data.block_size=600 needs 602 positions but model.max_positions=514, lower block_size or "
     "raise max_positions"),
    ({"data.path": "/nonexistent/corpus-*.txt"},
     "data.path='/nonexistent/corpus-*.txt' matches no text file; check the path"),
    ({"data.path": "EMPTY"}, "is empty (0 bytes); remove it or fix data.path"),
    ({"guards.nonfinite_policy": "retry"},
     "guards.nonfinite_policy='retry' must be one of ('stop', 'rollback')"),
    ({"model.encoder.hidden": 32, "model.encoder.mlp_dim": 64},
     "would change how the run trains: model.encoder.hidden 64 -> 32, model.encoder.mlp_dim "
     "256 -> 64; rerun with the run's settings"),
    ({"model.encoder.hidden": 32, "model.encoder.mlp_dim": 64,
      "resume_allow_changes": "total_steps,data,model"},
     "does not fit this config: ")])
def test_bad_config_or_data_on_an_existing_run(setup, run_dir, tmp_path, override, message):
  if override.get("data.path") == "EMPTY":
    override = {"data.path": _empty(str(tmp_path / "empty.txt"))}
    message = f"text file {override['data.path']} " + message
  # The relaunch trains longer and on other data: allowed, so the data's own error shows.
  override = {"resume_allow_changes": "total_steps,data", **override}
  cfg = parse(text_args(setup, total_steps=4, **override))
  with Unchanged(run_dir):
    with pytest.raises(config_lib.ConfigError) as e:
      train.run(cfg, run_dir)
  msg = str(e.value)
  assert message in msg and "\n" not in msg, msg
  if "model" in override["resume_allow_changes"]:  # allowed, but the checkpoint cannot fit
    assert msg.startswith(f"checkpoint step 2 of {run_dir} does not fit this config: ")
    assert "[64] in the checkpoint, [32] in this config" in msg, msg
    assert msg.endswith(f"resume with the run's own config ({run_dir}/config.json) or choose "
                        "another --workdir")


def _cli(main, argv: list[str], capsys) -> tuple[int, str]:
  """A command line run in-process (fresh flag values per call): (exit status, stderr)."""
  with pytest.raises(SystemExit) as e:
    main(argv)
  return e.value.code, capsys.readouterr().err


def test_cli_bad_keys_and_values_one_line_exit_2(setup, run_dir, capsys):
  prog = ["python -m d2v_jax.train", "--workdir", run_dir]
  with Unchanged(run_dir):
    code, err = _cli(train.main, prog + text_args(setup) + ["--config.optim.lrr=1"], capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith(
        "error: unknown config key 'optim.lrr' (no 'lrr' under optim; valid there: [")
    code, err = _cli(train.main, prog + text_args(setup) + ["--config.total_steps=many"], capsys)
    assert code == 2 and "total_steps" in err and "Traceback" not in err
    code, err = _cli(train.main, prog + text_args(setup, **{"data.mask_prob": 1.5}), capsys)
    assert code == 2 and err.strip().splitlines() == ["error: data.mask_prob=1.5 must be in [0, 1]"]


def test_run_directory_that_is_not_writable(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with Unchanged(str(tmp_path)):
    with pytest.raises(config_lib.ConfigError) as e:
      train.preflight(str(blocker / "run"))
  assert str(e.value) == (f"run directory {str(blocker / 'run')!r} is not writable ({blocker} is "
                          "a file, not a directory); fix permissions or choose another --workdir")


def test_export_without_a_checkpoint(tmp_path, capsys):
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text("{}")
  with Unchanged(str(tmp_path)):
    with pytest.raises(checkpoint.NoCheckpoint, match="has no checkpoints/ directory: train first"):
      export_lib.export(str(run), str(tmp_path / "hf"))
  # A crash during the first save leaves only a temporary directory: still no checkpoint.
  (run / "checkpoints" / ("2" + checkpoint.TMP_SUFFIX)).mkdir(parents=True)
  with Unchanged(str(tmp_path)):
    with pytest.raises(checkpoint.NoCheckpoint, match="holds no finished checkpoint"):
      export_lib.export(str(run), str(tmp_path / "hf"))
  code, err = _cli(export_lib.main, ["--workdir", str(run), "--out", str(tmp_path / "hf")], capsys)
  assert code == 2 and err.strip().splitlines()[-1].startswith(f"error: {run}/checkpoints holds no finished")


def test_export_refuses_a_directory_holding_another_model(run_dir, tmp_path):
  other = tmp_path / "other_model"
  other.mkdir()
  (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
  (other / "model.safetensors").write_bytes(b"\x00" * 64)
  with Unchanged(run_dir, str(other)):
    with pytest.raises(export_lib.ExportError) as e:
      export_lib.export(run_dir, str(other))
  assert str(e.value) == (f"{other} is not empty and was not written by d2v_jax.export; pass "
                          "--overwrite to replace its model files or choose another --out")
  # An export of another run is refused too; the same run may be re-exported (an update).
  mine = str(tmp_path / "mine")
  export_lib.export(run_dir, mine)
  theirs = tmp_path / "their_export"
  theirs.mkdir()
  (theirs / export_lib.MARKER).write_text(json.dumps({"workdir": "/elsewhere/run"}))
  with Unchanged(run_dir, str(theirs)):
    with pytest.raises(export_lib.ExportError, match="already holds an export of /elsewhere/run; "
                                                     "pass --overwrite"):
      export_lib.export(run_dir, str(theirs))
  export_lib.export(run_dir, mine)
  export_lib.export(run_dir, str(other), overwrite=True)
  with open(other / export_lib.MARKER) as f:
    assert json.load(f)["workdir"] == os.path.abspath(run_dir)


@pytest.mark.slow
def test_corrupt_image_stops_with_its_name(tmp_path):
  """data.on_bad_image=stop: the first corrupt image ends the launch with its path; the run
  it was resuming is untouched (skip, the default, is tested in test_vision_data)."""
  images = write_images(str(tmp_path / "images"), n=8)
  run = str(tmp_path / "run")
  train.run(parse(vision_args(images, total_steps=1, checkpoint_every=1)), run)
  # A new data directory: one good image and one corrupt one (so every batch holds it).
  mixed = tmp_path / "mixed"
  mixed.mkdir()
  shutil.copy(os.path.join(images, "00.png"), mixed / "00.png")
  bad = mixed / "01_corrupt.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))   # PNG signature, garbage body
  with Unchanged(run, str(mixed)):
    with pytest.raises(config_lib.ConfigError) as e:
      train.run(parse(vision_args(str(mixed), total_steps=4,
                                  **{"data.on_bad_image": "stop",
                                     "resume_allow_changes": "total_steps,data"})), run)
  msg = str(e.value)
  assert msg.startswith(f"bad image {bad}: ") and "\n" not in msg
  assert msg.endswith("; fix or remove it, or set --config.data.on_bad_image=skip")


@pytest.mark.slow
def test_unreadable_audio_file_is_named(tmp_path):
  wavs = write_wavs(str(tmp_path / "wavs"))
  run = str(tmp_path / "run")
  train.run(parse(audio_args(wavs, total_steps=1, checkpoint_every=1)), run)
  bad = tmp_path / "wavs" / "zz_unreadable.wav"
  bad.write_bytes(b"this is not audio " * 50)
  with Unchanged(run, str(tmp_path / "wavs")):
    with pytest.raises(config_lib.ConfigError) as e:
      train.run(parse(audio_args(wavs, total_steps=4, resume_allow_changes="total_steps")), run)
  # Not RIFF, so it goes to ffmpeg (or: "ffmpeg is not installed ..." where it is missing).
  msg = str(e.value)
  assert msg.startswith(f"bad audio file {bad}: cannot be read (") and "\n" not in msg, msg
  assert "ffmpeg cannot decode it: " in msg or "ffmpeg is not installed" in msg


def test_mesh_that_does_not_fit_fails_before_any_data_is_prepared(setup, tmp_path):
  """The mesh / batch checks run before data preparation (tokenizer training, corpus caching,
  audio indexing take minutes on real data): the error comes at once and nothing is cached."""
  work, cache = tmp_path / "fresh", tmp_path / "cache"
  cfg = parse(text_args(setup, total_steps=4, **{"batch_size": 12, "mesh.preset": "dp",
                                                 "data.cache_dir": str(cache)}))
  with pytest.raises(config_lib.ConfigError) as e:
    train.run(cfg, str(work))
  msg = str(e.value)
  assert msg == ("batch_size=12 is not divisible by the 8 batch shards (mesh data=8 x fsdp=1); "
                 "use a multiple of 8"), msg
  assert not cache.exists() or not any(cache.iterdir()), sorted(cache.iterdir())
