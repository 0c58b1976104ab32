"""fairseq checkpoints in: a data2vec 2.0 checkpoint written in fairseq's own format by fairseq's
own model (text, audio with ALiBi, images; the EMA teacher differs from the student) goes
through `python -m d2v_jax.init --fairseq` and `python -m d2v_jax.export`, and the Hugging Face
model (remote code for ALiBi audio and fairseq's ViT) reproduces fairseq's extract_features
to 1e-4. Also: fairseq's text vocabulary as an HF tokenizer, and one-line import errors.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import fairseq_models as M

TOL = 1e-4


def save_fairseq(fs, model, model_cfg: dict, path: str) -> None:
  """What fairseq's trainer writes (with fairseq's own writer): cfg as an OmegaConf
  DictConfig, the model's state dict (EMA teacher inside), optimizer history. (fairseq's own
  loader cannot read it back under torch >= 2.6, whose torch.load refuses pickled
  DictConfigs by default; ours passes weights_only=False, as a trusted file allows.)"""
  from omegaconf import OmegaConf
  from fairseq import checkpoint_utils
  state = {"args": None, "cfg": OmegaConf.create({"model": model_cfg, "task": {"_name": "x"}}),
           "model": model.state_dict(), "criterion": None,
           "optimizer_history": [{"criterion_name": "ModelCriterion", "optimizer_name": "Adam",
                                  "lr_scheduler_state": {}, "num_updates": 7}],
           "task_state": {}, "extra_state": {"epoch": 1}, "last_optimizer_state": None}
  checkpoint_utils.torch_persistent_save(state, path)


def gpt2_files(fs, folder: str) -> list[str]:
  """A tiny GPT-2 byte-level BPE (every byte + a few merges) and a fairseq dict.txt listing its
  ids in a shuffled order, as fairseq ships them (encoder.json, vocab.bpe, dict.txt)."""
  from fairseq.data.encoders.gpt2_bpe_utils import bytes_to_unicode
  byte_chars = bytes_to_unicode()
  encoder = {byte_chars[b]: b for b in range(256)}
  merges = [("t", "h"), ("th", "e"), ("Ġ", "t"), ("Ġ", "the"), ("e", "n"), ("Ġthe", "n"),
            ("m", "e"), ("the", "me")]
  for a, b in merges:
    encoder[a + b] = len(encoder)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "encoder.json"), "w") as f:
    json.dump(encoder, f)
  with open(os.path.join(folder, "vocab.bpe"), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  order = np.random.default_rng(0).permutation(len(encoder))
  with open(os.path.join(folder, "dict.txt"), "w") as f:
    f.write("".join(f"{i} {1000 - n}\n" for n, i in enumerate(order)))
  return [os.path.join(folder, n) for n in ("dict.txt", "encoder.json", "vocab.bpe")]


def test_fairseq_vocab_tokenizer_gives_fairseq_ids(fs, tmp_path):
  from fairseq.data.encoders.gpt2_bpe_utils import get_encoder
  from d2v_jax.data import fairseq_vocab
  from d2v_jax.data.text_tokenizer import load_tokenizer
  dict_txt, enc_json, bpe = gpt2_files(fs, str(tmp_path / "vocab"))
  n = fairseq_vocab.build(dict_txt, enc_json, bpe, str(tmp_path / "tok"))
  d = fs.Dictionary.load(dict_txt)
  d.add_symbol("<mask>")
  assert n == len(d)
  tok = load_tokenizer(str(tmp_path / "tok"))
  assert (tok.pad_token_id, tok.mask_token_id) == (d.pad(), d.index("<mask>"))
  gpt2 = get_encoder(enc_json, bpe)
  merged = 0
  for text in ("the theme then", "then the men met them.", "Théâtre 42 ¡x!"):
    ours = tok(text, add_special_tokens=False)["input_ids"]
    ref = d.encode_line(" ".join(map(str, gpt2.encode(text))), add_if_not_exist=False,
                        append_eos=False).tolist()
    assert ours == ref, text
    merged += len(text.encode()) - len(ref)
  assert merged >= 10   # the merges were used, not just bytes


def _import_export(fs, model, model_cfg, tmp_path, *extra) -> tuple[str, str]:
  """The fairseq model written as a fairseq checkpoint, `init --fairseq` (with `extra`), then
  `export`: (run dir, HF dir)."""
  from d2v_jax import export, init
  ckpt, run, hf = (str(tmp_path / n) for n in ("checkpoint_last.pt", "run", "hf"))
  save_fairseq(fs, model, model_cfg, ckpt)
  init.main(["--fairseq", ckpt, "--workdir", run, *extra])
  export.main(["--workdir", run, "--out", hf])
  return run, hf


def _hf_model(hf: str, cls=None):
  from transformers import AutoModel
  model = (cls or AutoModel).from_pretrained(hf, trust_remote_code=True)
  return model.eval()


def test_v2_text_checkpoint_imports_and_exports(fs, tmp_path):
  torch = fs.torch
  dict_txt, _, _ = gpt2_files(fs, str(tmp_path / "vocab"))
  vocab = fs.Dictionary.load(dict_txt)
  vocab.add_symbol("<mask>")
  model, model_cfg = M.v2_text_model(fs, vocab)
  _import_export(fs, model, model_cfg, tmp_path, "--vocab", str(tmp_path / "vocab"))
  from transformers import AutoTokenizer, Data2VecTextModel
  tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  ids = tok(["the theme then", "them then"], padding=True, return_tensors="pt")["input_ids"]
  model.eval()
  with torch.no_grad():
    want = model.extract_features(ids, mode="TEXT", padding_mask=ids.eq(1), mask=False)["x"]
    got = _hf_model(str(tmp_path / "hf"), Data2VecTextModel)(
        input_ids=ids, attention_mask=ids.ne(1)).last_hidden_state
  err = float((got - want)[ids.ne(1)].abs().max())
  print(f"\nv2 text fairseq -> HF Data2VecTextModel: max |diff| {err:.1e}")
  assert err <= TOL


def test_v2_audio_alibi_checkpoint_imports_and_exports_remote_code(fs, tmp_path):
  torch = fs.torch
  model, model_cfg = M.v2_audio_model(fs)
  _import_export(fs, model, model_cfg, tmp_path, "--config.data.max_samples=1600",
                 "--config.data.min_samples=1600", "--config.data.buckets=(1600,)")
  with open(tmp_path / "hf" / "config.json") as f:
    assert json.load(f)["auto_map"]["AutoModel"] == "modeling_d2v_audio_alibi.Data2VecAudioAlibiModel"
  audio = torch.from_numpy(np.random.default_rng(1).normal(size=(2, 1600)).astype(np.float32))
  model.eval()
  with torch.no_grad():
    want = model.extract_features(audio, mode="AUDIO", mask=False)["x"]
    hf = _hf_model(str(tmp_path / "hf"))
    got = hf(input_values=audio).last_hidden_state
  assert type(hf).__name__ == "Data2VecAudioAlibiModel"
  scale = model.modality_encoders["AUDIO"].alibi_scale.detach().reshape(-1)
  np.testing.assert_allclose(hf.encoder.alibi_scale.detach().numpy(), scale.numpy())
  err = float((got - want).abs().max())
  print(f"\nv2 audio (ALiBi) fairseq -> HF remote code: max |diff| {err:.1e}")
  assert err <= TOL


def test_v2_image_checkpoint_imports_and_exports_remote_code(fs, tmp_path):
  torch = fs.torch
  model, model_cfg = M.v2_image_model(fs)
  run, _ = _import_export(fs, model, model_cfg, tmp_path, "--config.data.min_mask_block=1")
  from d2v_jax import export
  export.main(["--workdir", run, "--out", str(tmp_path / "hf_teacher"), "--weights", "teacher"])
  image = torch.from_numpy(np.random.default_rng(1).normal(size=(2, 3, 16, 16)).astype(np.float32))
  model.eval()
  teacher = model.ema.model.eval()
  with torch.no_grad():
    want = model.extract_features(image, mode="IMAGE", mask=False)["x"]
    want_t = teacher.extract_features(image, mode="IMAGE", mask=False)["x"]
    got = _hf_model(str(tmp_path / "hf"))(pixel_values=image).last_hidden_state[:, 1:]
    got_t = _hf_model(str(tmp_path / "hf_teacher"))(pixel_values=image).last_hidden_state[:, 1:]
  assert float((want - want_t).abs().max()) > 100 * TOL   # the teacher is not the student
  err, err_t = float((got - want).abs().max()), float((got_t - want_t).abs().max())
  print(f"\nv2 images fairseq -> HF remote code: student {err:.1e}, teacher {err_t:.1e}")
  assert err <= TOL and err_t <= TOL


def test_import_errors_are_one_line_and_write_nothing(fs, tmp_path, capsys):
  from d2v_jax import init
  torch = fs.torch
  model, model_cfg = M.v2_audio_model(fs)
  state = model.state_dict()
  state["modality_encoders.AUDIO.surprise.weight"] = torch.zeros(3)
  bad = str(tmp_path / "extra.pt")
  torch.save({"cfg": {"model": model_cfg}, "model": state}, bad)
  not_ckpt = str(tmp_path / "notes.pt")
  with open(not_ckpt, "w") as f:
    f.write("not a checkpoint")
  other = str(tmp_path / "mae.pt")
  torch.save({"cfg": {"model": {"_name": "mae"}}, "model": {}}, other)
  cases = [(bad, "surprise.weight"), (not_ckpt, "not a readable fairseq checkpoint"),
           (other, "'mae' is not a data2vec model"),
           (str(tmp_path / "missing.pt"), "does not exist")]
  for path, expect in cases:
    run = tmp_path / f"run_{os.path.basename(path)}"
    with pytest.raises(SystemExit) as e:
      init.main(["--fairseq", path, "--workdir", str(run), "--config.data.max_samples=1600",
                 "--config.data.min_samples=1600", "--config.data.buckets=(1600,)"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    assert expect in err[0], err
    assert not run.exists()


def test_training_continues_from_a_fairseq_checkpoint(fs, tmp_path, capsys):
  """--config.init.fairseq on the base v2 recipe: the checkpoint's architecture and objective,
  its student and EMA teacher at step 0, then our steps on real speech."""
  from conftest import ROOT
  from d2v_jax import config as config_lib, metrics, train
  prompts = os.path.join(ROOT, "data", "audio", "prompts")
  if not os.path.isdir(prompts):
    pytest.skip(f"{prompts} missing: run .ci/setup")
  model, model_cfg = M.v2_audio_model(fs)
  ckpt = str(tmp_path / "checkpoint_best.pt")
  save_fairseq(fs, model, model_cfg, ckpt)
  cfg = config_lib.load_file("configs/audio.py:variant=base,v2")
  cfg.init.fairseq = ckpt
  cfg.data.update(dict(source="files", path=os.path.join(prompts, "*.wav"), audio_key="audio",
                       max_samples=1600, min_samples=1600, buckets=(1600,)))
  cfg.update(dict(batch_size=8, total_steps=2, checkpoint_every=2, log_every=1))
  cfg.optim.warmup_steps = 1
  run = str(tmp_path / "run")
  train.run(cfg, run)
  out = capsys.readouterr().out
  assert "initialised from fairseq checkpoint" in out and "EMA teacher" in out
  assert (cfg.model.encoder.hidden, cfg.model.alibi, cfg.v2.clone_batch) == (32, True, 2)
  rows = metrics.read(run)
  assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
  # fairseq's EMA decay at updates 1 and 2 (0.9 -> 0.99 over 10)
  np.testing.assert_allclose([r["tau"] for r in rows], [0.909, 0.918], rtol=1e-6)
