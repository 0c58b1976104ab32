"""`python -m d2v_jax.data` (one input-pipeline CLI for every modality), in-process."""

import os

from d2v_jax.data import __main__ as data_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VISION = os.path.join(ROOT, "configs", "vision.py") + ":variant=tiny,runlocal"


def test_batches_prints_shapes_and_mask_counts(tmp_path, capsys):
  assert data_cli.main(["batches", "--config", VISION, "--steps", "2", "--workdir", str(tmp_path)]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2 and lines[0].startswith("step 0: image (16, 64, 64, 3) mean ")
  assert "mask (16, 64) 39-39 set per row" in lines[1]   # BEiT's 120/196 of an 8 x 8 grid


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
  code = data_cli.main(["batches", "--config", VISION, "--config.data.path=/nonexistent"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and err == [
      "error: data.path='/nonexistent' matches no image file with extension in ['.bmp', '.gif', "
      "'.jpeg', '.jpg', '.png', '.webp'] (check data.extensions); check the path"]
  code = data_cli.main(["train-tokenizer", "--input", str(tmp_path / "none*.txt"), "--out", str(tmp_path / "t")])
  assert code == 2 and "matches no text file" in capsys.readouterr().err
