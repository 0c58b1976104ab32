"""Continued pretraining from Hugging Face weights or another run (d2v_jax/init.py), and
export of the student or the teacher (d2v_jax/export.py --weights).

Round trip per family: a perturbed HF model saved with save_pretrained -> init.hf -> our
TrainState (student and teacher) -> orbax checkpoint -> d2v_jax.export -> model.safetensors
holds bitwise the weights we imported. The HF pooler (text) is not a pretraining weight: it is
dropped on import and our export writes none, so it is left out of the comparison.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file

from d2v_jax import build as build_lib, checkpoint, config as config_lib, ema, export, init as init_cli
from d2v_jax import init_weights, resolve
from d2v_jax.hf import common
from d2v_jax.modality import load as load_modality
from hf_utils import perturb_, train_tiny_bpe
from step_utils import run_steps, tiny_text_config


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / "tokenizer")
  return path, len(train_tiny_bpe(path))


def set_init(cfg, hf: str = "", ckpt: str = ""):
  cfg.init = ml_collections.ConfigDict(dict(hf=hf, checkpoint=ckpt, fairseq=""))
  return cfg


def text_cfg(tokenizer_dir, **overrides):
  path, vocab = tokenizer_dir
  return set_init(tiny_text_config(**{"model.vocab_size": vocab, "data.tokenizer": path, **overrides}))


def vision_cfg(**model):
  cfg = config_lib.load_file("configs/vision.py:variant=tiny,runlocal")
  cfg.batch_size = 8
  cfg.model.update(model)
  load_modality("vision").data.prepare(cfg, "")
  return set_init(cfg)


def audio_cfg():
  cfg = config_lib.load_file("configs/audio.py:variant=tiny")
  cfg.batch_size, cfg.data.max_samples, cfg.data.min_samples = 8, 8000, 4000
  return set_init(cfg)


def host(tree):
  return flatten_dict(common.unbox(jax.device_get(tree)), sep="/")


def assert_same(a: dict, b: dict, what: str):
  assert set(a) == set(b), (what, sorted(set(a) ^ set(b))[:5])
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=f"{what}: {k}")


def save_run(workdir: str, state, cfg, step: int) -> None:
  mngr = checkpoint.manager(workdir, async_save=False)
  checkpoint.save(mngr, step, state, {"step": step, "data_position": step, "modality": cfg.modality,
                                      "config": config_lib.to_dict(cfg)})
  mngr.wait_until_finished()
  mngr.close()


def hf_model(family: str, cfg, seed: int = 0):
  """A perturbed base model of `family` with our config's shapes."""
  hf_map = load_modality(cfg.modality).hf()
  ours = hf_map.hf_config(cfg).to_dict()
  for k in ("model_type", "transformers_version", "architectures"):
    ours.pop(k, None)
  cls = {"data2vec-text": (transformers.Data2VecTextConfig, transformers.Data2VecTextModel),
         "roberta": (transformers.RobertaConfig, transformers.RobertaForMaskedLM),
         "data2vec-vision": (transformers.Data2VecVisionConfig, transformers.Data2VecVisionModel),
         "beit": (transformers.BeitConfig, transformers.BeitModel),
         "data2vec-audio": (transformers.Data2VecAudioConfig, transformers.Data2VecAudioModel)}[family]
  torch.manual_seed(seed)
  model = cls[1](cls[0](**ours)).eval()
  perturb_(model, seed=seed)
  return model


def base_state(model) -> dict[str, np.ndarray]:
  """Base-model weights of an HF model without its head prefix, as float32 numpy."""
  prefix = model.base_model_prefix + "."
  out = {}
  for k, v in model.state_dict().items():
    if k.startswith(prefix):
      out[k[len(prefix):]] = v.numpy()
    elif not hasattr(model, model.base_model_prefix):
      out[k] = v.numpy()
  return out


CASES = [("text", "data2vec-text"), ("text", "roberta"), ("vision", "data2vec-vision"),
         ("vision", "beit"), ("audio", "data2vec-audio")]


@pytest.fixture(scope="module")
def envs(tokenizer_dir):
  """modality -> (cfg, built on the 8 test devices, fresh state); built lazily, once."""
  cache = {}

  def get(modality):
    if modality not in cache:
      cfg = {"text": lambda: text_cfg(tokenizer_dir), "vision": vision_cfg, "audio": audio_cfg}[modality]()
      built = build_lib.build(cfg)
      cache[modality] = (cfg, built, built.init(cfg.seed))
    return cache[modality]
  return get


def with_init(cfg, hf: str = "", ckpt: str = ""):
  """A copy of cfg with other init keys (the Built keeps the original)."""
  return set_init(config_lib.from_dict(config_lib.to_dict(cfg)), hf, ckpt)


@pytest.mark.parametrize("modality,family", CASES)
def test_hf_import_round_trip(modality, family, envs, tmp_path):
  cfg, built, fresh = envs(modality)
  model = hf_model(family, cfg)
  hf_dir, workdir, out = (str(tmp_path / n) for n in ("hf", "run", "export"))
  model.save_pretrained(hf_dir)
  cfg = with_init(cfg, hf=hf_dir)

  fresh_head = host(fresh.params["head"])
  state = init_weights.initial_params(cfg, built, fresh)

  hf_map = load_modality(modality).hf()
  want = flatten_dict(common.load(hf_map, hf_dir, cfg), sep="/")
  params = host(state.params)
  assert_same({k: v for k, v in params.items() if not k.startswith("head/")}, want, "student")
  assert_same({k[5:]: v for k, v in params.items() if k.startswith("head/")}, fresh_head, "head")
  teacher = host(state.teacher)
  assert {k.split("/")[0] for k in teacher} == set(cfg.teacher.ema_subtrees)
  assert_same(teacher, {k: v for k, v in params.items() if k.split("/")[0] in cfg.teacher.ema_subtrees},
              "teacher")
  assert int(state.step) == 0
  opt = [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(state.opt_state))]
  assert all(not x.any() for x in opt)  # Adam moments and counts: fresh
  # placed like a fresh init (the jitted step's in_shardings)
  for got, sh in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(built.state_shardings)):
    assert got.sharding.is_equivalent_to(sh, got.ndim)

  save_run(workdir, state, cfg, 0)
  export.export(workdir, out)
  exported = load_file(os.path.join(out, "model.safetensors"))
  original = base_state(model)
  names = set(common.expected_shapes(hf_map, cfg))
  assert names <= set(exported)
  extra = set(exported) - names  # weights we export beyond what the import reads
  assert extra <= {"embeddings.mask_token", "masked_spec_embed"}, extra
  for name in names | extra:
    np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
  assert not any(k.startswith("pooler.") for k in exported)


@pytest.fixture(scope="module")
def trained_run(tokenizer_dir, tmp_path_factory):
  """Three real steps of a tiny text run, checkpointed."""
  cfg = text_cfg(tokenizer_dir, **{"teacher.tau_start": 0.9, "teacher.tau_end": 0.9})
  state, metrics, _ = run_steps(cfg, 3, devices=jax.devices()[:1])
  assert all(np.isfinite(m["loss"]) for m in metrics)
  workdir = str(tmp_path_factory.mktemp("runA"))
  save_run(workdir, state, cfg, 3)
  return workdir, state, cfg


def test_init_from_checkpoint(trained_run, envs):
  workdir, prev, prev_cfg = trained_run
  _, built, fresh = envs("text")  # same shapes as the run; 8 devices (the run used 1)
  state = init_weights.initial_params(with_init(prev_cfg, ckpt=workdir), built, fresh)
  params = host(state.params)
  assert_same(params, host(prev.params), "params (head included)")
  assert_same(host(state.teacher), {k: v for k, v in params.items() if k.startswith("encoder/")},
              "teacher = student")
  # the previous run's teacher is not read: it differs from its student after 3 steps
  assert max(np.abs(v - params[k]).max() for k, v in host(prev.teacher).items()) > 1e-5
  assert int(state.step) == 0 and int(prev.step) == 3
  assert all(not np.asarray(x).any() for x in jax.tree_util.tree_leaves(jax.device_get(state.opt_state)))


def test_export_student_and_teacher(trained_run, tmp_path):
  workdir, state, cfg = trained_run
  outs = {}
  for weights in ("student", "teacher"):
    out = export.export(workdir, str(tmp_path / weights), weights=weights)
    outs[weights] = load_file(os.path.join(out, "model.safetensors"))
  hf_text = load_modality("text").hf()
  want = {"student": common.to_hf_state(hf_text, state.params, cfg),
          "teacher": common.to_hf_state(hf_text, ema.teacher_params(state.params, state.teacher), cfg)}
  for w in outs:
    assert_same(outs[w], want[w], w)
  diff = {k: float(np.abs(outs["student"][k] - outs["teacher"][k]).max()) for k in outs["student"]}
  # the encoder is the EMA copy; embeddings are shared with the student (teacher.ema_subtrees)
  assert min(v for k, v in diff.items() if k.startswith("encoder.")) > 0
  assert max(v for k, v in diff.items() if k.startswith("embeddings.")) == 0
  print(f"teacher vs student export: max |diff| encoder {max(diff.values()):.2e}")


def _hf_dir(tmp_path, model) -> str:
  path = str(tmp_path / "hf")
  model.save_pretrained(path)
  return path


def test_import_mismatch_names_the_weight(envs, tmp_path):
  cfg, built, fresh = envs("text")
  base = {k: v for k, v in load_modality("text").hf().hf_config(cfg).to_dict().items()
          if k not in ("model_type", "architectures", "transformers_version")}

  def variant(name, **kw):
    return _hf_dir(tmp_path / name, transformers.Data2VecTextModel(transformers.Data2VecTextConfig(**{**base, **kw})))

  cases = [
      (variant("mlp", intermediate_size=128),
       r"encoder\.layer\.0\.intermediate\.dense\.weight.* shape \(128, 64\) .*expects \(256, 64\)"),
      (variant("deep", num_hidden_layers=3), r"encoder\.layer\.2\.attention\.self\.query\.weight.*deeper"),
      (variant("heads", num_attention_heads=4), r"num_attention_heads=4 .*2"),
      (_hf_dir(tmp_path / "bert", transformers.BertModel(transformers.BertConfig(
          hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256))),
       r"'bert' model .*data2vec-text or roberta"),
      (str(tmp_path / "nowhere"), r"not a directory"),
  ]
  for path, pattern in cases:  # through the trainer's entry point
    with pytest.raises(config_lib.ConfigError, match=pattern):
      init_weights.initial_params(with_init(cfg, hf=path), built, fresh)
  with pytest.raises(config_lib.ConfigError, match="both set"):
    init_weights.initial_params(with_init(cfg, hf=variant("ok"), ckpt=str(tmp_path)), built, fresh)


def test_import_mismatch_vision_audio(tmp_path):
  """The family / shape / structure checks run before anything is built (init.load_hf)."""
  vision = _hf_dir(tmp_path / "v", hf_model("data2vec-vision", vision_cfg()))
  # 32 px images: a 4x4 grid needs a (2*4-1)^2+3 = 52-row relative position table, not 228
  # (the expected shapes are our model's own: its masks must fit the 16-patch grid)
  small = vision_cfg(image_size=32)
  small.data.min_mask_block = 4
  with pytest.raises(config_lib.ConfigError,
                     match=r"relative_position_bias_table' has shape \(228, 2\) .*expects \(52, 2\)"):
    init_weights.load_hf(vision, small, load_modality("vision"))
  with pytest.raises(config_lib.ConfigError, match=r"'data2vec-vision' model .*a audio run imports data2vec-audio"):
    init_weights.load_hf(vision, audio_cfg(), load_modality("audio"))
  audio = _hf_dir(tmp_path / "a", hf_model("data2vec-audio", audio_cfg()))
  cfg = audio_cfg()
  cfg.model.conv_strides = (5, 2, 2, 2, 2, 2, 1)  # no weight shape shows a stride
  with pytest.raises(config_lib.ConfigError,
                     match=r"conv_stride=\[5, 2, 2, 2, 2, 2, 2\] but this config has \[5, 2, 2, 2, 2, 2, 1\]"):
    init_weights.load_hf(audio, cfg, load_modality("audio"))
  cfg = audio_cfg()
  cfg.model.conv_dims = (32,) * 7
  with pytest.raises(config_lib.ConfigError,
                     match=r"feature_extractor\.conv_layers\.0\.conv\.weight' has shape \(64, 1, 10\) .*\(32, 1, 10\)"):
    init_weights.load_hf(audio, cfg, load_modality("audio"))


def test_init_checkpoint_mismatch_names_the_weight(trained_run):
  workdir, _, prev_cfg = trained_run
  cfg = with_init(prev_cfg, ckpt=workdir)
  cfg.model.encoder.mlp_dim = 128
  with pytest.raises(config_lib.ConfigError,
                     match=r"params/encoder/layers/block/fc1/bias has shape \(2, 256\) "
                           r"but this config expects \(2, 128\)"):
    init_weights.load_run_params(workdir, cfg, build_lib.build(cfg))  # build() compiles nothing
  cfg = with_init(audio_cfg(), ckpt=workdir)
  with pytest.raises(config_lib.ConfigError, match=r"is a 'text' run; this run is 'audio'"):
    init_weights.load_run_params(workdir, cfg, build_lib.build(cfg))


# ------------------------------------------------------ bring your own HF model (init.hf)


@pytest.fixture(scope="module")
def bert_vocab_model(tmp_path_factory):
  """A perturbed random-init Data2VecText of a non-default size (3 x 96, 4 heads, mlp 160,
  40 positions, eps 1e-12) with a BERT WordPiece vocabulary ([PAD]=0, [CLS]=2, [SEP]=3, one
  token type), saved with its tokenizer (padding / truncation on, as published)."""
  from byo_utils import data2vec_text_dir
  from hf_utils import SENTENCES
  path = str(tmp_path_factory.mktemp("bert_vocab") / "hf")
  model, tok = data2vec_text_dir(path, SENTENCES * 4)
  return path, model, tok


def test_init_hf_takes_the_architecture_and_exports_it_back(bert_vocab_model, tmp_path, capsys):
  """`python -m d2v_jax.init --hf DIR --workdir RUN` needs no model key; the export of RUN
  equals the source in HF PyTorch on a padded batch and carries its special ids."""
  from transformers import AutoModel, AutoTokenizer
  src, model, tok = bert_vocab_model
  run, out = str(tmp_path / "run"), str(tmp_path / "export")
  init_cli.main(["--hf", src, "--workdir", run])
  printed = capsys.readouterr().out
  assert "model.encoder.num_layers=3, model.encoder.hidden=96, model.encoder.heads=4" in printed
  assert f"data.tokenizer={src}" in printed and "data.block_size=39" in printed
  export.export(run, out)

  hf = json.load(open(os.path.join(out, "config.json")))
  want = {"num_hidden_layers": 3, "hidden_size": 96, "num_attention_heads": 4,
          "intermediate_size": 160, "max_position_embeddings": 40, "type_vocab_size": 1,
          "layer_norm_eps": 1e-12, "vocab_size": len(tok),
          "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}   # [PAD] [CLS] [SEP]
  assert {k: hf[k] for k in want} == want
  assert json.load(open(os.path.join(out, "d2v_export.json")))["step"] == 0
  assert AutoTokenizer.from_pretrained(out).get_vocab() == tok.get_vocab()

  got = AutoModel.from_pretrained(out).eval()
  batch = tok(["In the beginning God created the heaven and the earth.", "light",
               "And God said, Let there be light: and there was light."],
              padding=True, return_tensors="pt")
  valid = batch["attention_mask"].numpy().astype(bool)
  assert valid.sum(1).tolist() == [13, 3, 16] and valid.shape[1] == 16   # really padded
  with torch.no_grad():
    a = model(**batch).last_hidden_state.numpy()
    b = got(**batch).last_hidden_state.numpy()
  assert np.abs(a).max() > 0.5
  diff = float(np.abs(a - b)[valid].max())
  assert diff <= 1e-5, diff
  exported = load_file(os.path.join(out, "model.safetensors"))
  for name, x in base_state(model).items():
    if not name.startswith("pooler."):
      np.testing.assert_array_equal(exported[name], x, err_msg=name)

  with pytest.raises(SystemExit):       # an existing run is never overwritten
    init_cli.main(["--hf", src, "--workdir", run])
  assert "already holds a checkpoint (step 0)" in capsys.readouterr().err


def test_init_hf_command_line_keys(bert_vocab_model):
  """A model key given on the command line must agree with config.json (one-line error);
  keys not given follow the weights, pad_id / vocab_size included, then the tokenizer checks."""
  from reliability_utils import parse
  from d2v_jax.data import text as text_data
  src, _, tok = bert_vocab_model
  base = ["--config", "configs/text.py:variant=tiny", f"--config.init.hf={src}"]
  cfg = parse(base + ["--config.model.encoder.hidden=96"])     # agrees: fine
  resolve.resolve(cfg)
  enc = cfg.model.encoder
  assert (enc.num_layers, enc.hidden, enc.heads, enc.mlp_dim, enc.layer_norm_eps) == (3, 96, 4, 160, 1e-12)
  assert (cfg.model.max_positions, cfg.model.pad_id, cfg.model.type_vocab, cfg.model.vocab_size,
          cfg.data.tokenizer, cfg.data.block_size, cfg.target.top_k) == (40, 0, 1, len(tok), src, 39, 2)
  text_data.resolve_model_keys(cfg, text_data.load_tokenizer(cfg.data.tokenizer))
  assert (cfg.model.pad_id, cfg.model.vocab_size) == (0, len(tok))
  for flag, msg in [("model.encoder.num_layers=2", "--config.model.encoder.num_layers=2 contradicts "
                     f"init.hf={src!r} (config.json num_hidden_layers=3)"),
                    ("model.pad_id=1", "--config.model.pad_id=1 contradicts"),
                    ("model.encoder.layer_norm_eps=1e-05", "config.json layer_norm_eps=1e-12")]:
    cfg = parse(base + [f"--config.{flag}"])
    with pytest.raises(config_lib.ConfigError) as e:
      resolve.resolve(cfg)
    assert msg in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("modality", ["text", "vision", "audio"])
def test_init_hf_architecture_keys_round_trip(modality, tmp_path):
  """Every ARCH field of a config.json that differs from our defaults is taken over: the HF
  config we would export for the resolved run equals the directory's on all of them."""
  cls = {"text": transformers.Data2VecTextConfig, "vision": transformers.Data2VecVisionConfig,
         "audio": transformers.Data2VecAudioConfig}[modality]
  fields = {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 3,
            "intermediate_size": 80, "layer_norm_eps": 1e-7}
  fields.update({"text": dict(max_position_embeddings=66, pad_token_id=0, type_vocab_size=2,
                              vocab_size=777),
                 "vision": dict(image_size=48, patch_size=16, layer_scale_init_value=0.1),
                 "audio": dict(conv_dim=(24,) * 3, conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3),
                               conv_bias=True, num_conv_pos_embeddings=3, conv_pos_kernel_size=7,
                               num_conv_pos_embedding_groups=4)}[modality])
  cls(**fields).save_pretrained(str(tmp_path))
  cfg = config_lib.load_file(f"configs/{modality}.py:variant=tiny,runlocal")
  set_init(cfg, hf=str(tmp_path))
  init_weights.resolve_config(cfg)
  ours = load_modality(modality).hf().hf_config(cfg).to_dict()
  hf_json = json.load(open(tmp_path / "config.json"))
  arch = {f for f, _ in load_modality(modality).hf().ARCH}
  assert set(fields) <= arch and len(arch - set(fields)) <= 1   # vision: num_channels stays 3
  for field in arch:
    assert init_weights._norm(ours[field]) == init_weights._norm(hf_json[field]), field
  assert cfg.target.top_k <= 3
