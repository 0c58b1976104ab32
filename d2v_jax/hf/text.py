"""data2vec-text <-> Hugging Face `Data2VecTextModel` / `FlaxRobertaModel` (docs/algorithm.md
§5.1, §5.4). Our encoder is a post-LN RoBERTa, so the map is one-to-one (the fairseq -> HF
conversion names); the walk is d2v_jax/hf/common.py. `params['head']` (the data2vec
regression head) is a pretraining module and is not exported, as in the fairseq -> HF
conversion; neither is a pooler (never trained), except a freshly initialised one in the Flax
tree, which FlaxRobertaModel needs complete (complete_flax).
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from d2v_jax.config import ConfigError
from d2v_jax.data import sources, text as text_data
from d2v_jax.hf import common
from d2v_jax.hf.common import Table

FAMILY = "Data2VecText/RoBERTa"
FAMILIES = ("data2vec-text", "roberta")          # config.json model_type values we import
ARCHITECTURE = "Data2VecTextModel"
FLAX = True                                      # FlaxRobertaModel reads the export
ARCH = common.ENCODER_ARCH + (("max_position_embeddings", "model.max_positions"),
                              ("pad_token_id", "model.pad_id"), ("type_vocab_size", "model.type_vocab"),
                              ("vocab_size", "model.vocab_size"))
PREFIXES = ("data2vec_text.", "roberta.", "")     # Data2VecText*, Roberta* heads, base model
# What to check when a weight is missing or misshapen (the config keys behind the shapes).
HINT = "model.vocab_size / max_positions / type_vocab and the model.encoder sizes"
PROBE = "embeddings.word_embeddings.weight"      # present in every such checkpoint
# Files that make a directory a tokenizer directory (init.hf: data.tokenizer defaults to it).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer_config.json")
_NOT_TOKENIZER = {"config.json", "model.safetensors", "pytorch_model.bin", "flax_model.msgpack",
                  "d2v_config.json", "tf_model.h5", "generation_config.json", "d2v_export.json",
                  "README.md"}
# Weights (sharded ones and their index included) of a model directory used as data.tokenizer
# (init.hf): never copied with the tokenizer.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".msgpack", ".h5", ".index.json", ".onnx", ".pt",
                    ".ckpt", ".pth")


def table(cfg) -> Table:
  del cfg
  return Table(
      top=(("embeddings.word_embeddings", ("embed", "word"), "embed"),
           ("embeddings.position_embeddings", ("embed", "position"), "embed"),
           ("embeddings.token_type_embeddings", ("embed", "token_type"), "embed"),
           ("embeddings.LayerNorm", ("embed", "norm"), "norm")),
      block=(("attention.self.query", ("attention", "query"), "dense"),
             ("attention.self.key", ("attention", "key"), "dense"),
             ("attention.self.value", ("attention", "value"), "dense"),
             ("attention.output.dense", ("attention", "out"), "dense"),
             ("attention.output.LayerNorm", ("attn_norm",), "norm"),
             ("intermediate.dense", ("fc1",), "dense"),
             ("output.dense", ("fc2",), "dense"),
             ("output.LayerNorm", ("mlp_norm",), "norm")),
      layer_prefix="encoder.layer.{i}")


def check_representable(cfg) -> None:
  enc = cfg.model.encoder
  if cfg.model.vocab_size is None:
    raise ConfigError("model.vocab_size is unset: run d2v_jax.data.text.prepare (reads the "
                      "tokenizer) or pass --config.model.vocab_size")
  common.check_representable(cfg, [
      (enc.pre_ln, "model.encoder.pre_ln=True"), (enc.layer_scale > 0, "model.encoder.layer_scale>0"),
      (not enc.key_bias, "model.encoder.key_bias=False"), (enc.input_norm, "model.encoder.input_norm=True"),
      (enc.final_norm, "model.encoder.final_norm=True")],
      "Data2VecText/RoBERTa", "post-LN, k-bias, no extra norms", "configs/text.py encoder")


def hf_config(cfg, bos_id: int = 0, eos_id: int = 2):
  """transformers.Data2VecTextConfig for our text model (conversion-script values: 514/1/1e-5).
  bos / eos default to RoBERTa's <s>=0 / </s>=2; the export passes the tokenizer's own."""
  # transformers (seconds of import) only where an HF object is made
  from transformers import Data2VecTextConfig
  check_representable(cfg)
  m, enc = cfg.model, cfg.model.encoder
  return Data2VecTextConfig(
      vocab_size=m.vocab_size, hidden_size=enc.hidden, num_hidden_layers=enc.num_layers,
      num_attention_heads=enc.heads, intermediate_size=enc.mlp_dim, hidden_act="gelu",
      hidden_dropout_prob=enc.dropout, attention_probs_dropout_prob=enc.attention_dropout,
      max_position_embeddings=m.max_positions, type_vocab_size=m.type_vocab,
      initializer_range=0.02, layer_norm_eps=enc.layer_norm_eps, pad_token_id=m.pad_id,
      bos_token_id=int(bos_id), eos_token_id=int(eos_id), position_embedding_type="absolute")


def resolve_config(cfg, hf_path: str, explicit) -> list[str]:
  """What an init.hf directory fixes beyond ARCH (d2v_jax/init_weights.py): data.tokenizer =
  the directory when it holds a tokenizer, data.block_size within its positions. Keys in
  `explicit` (set on the command line) are left alone. Returns the "key=value" changes."""
  changed = []
  if not cfg.data.tokenizer and "data.tokenizer" not in explicit and any(
      os.path.exists(os.path.join(hf_path, f)) for f in TOKENIZER_FILES):
    cfg.data.tokenizer = hf_path
    changed.append(f"data.tokenizer={hf_path}")
  room = int(cfg.model.max_positions) - int(cfg.model.pad_id) - 1
  if cfg.data.block_size > room and "data.block_size" not in explicit:
    cfg.data.block_size = room
    changed.append(f"data.block_size={room}")
  return changed


def pooler(cfg, seed: int) -> dict:
  """A pooler initialised the way HF would (weight ~ N(0, 0.02) seeded by `seed`, bias 0), for
  consumers that need a complete base-model tree. Do not read meaning into pooler_output."""
  h = cfg.model.encoder.hidden
  rng = np.random.default_rng(seed)
  return {"kernel": rng.normal(0.0, 0.02, (h, h)).astype(np.float32),
          "bias": np.zeros((h,), np.float32)}


def complete_flax(tree: dict, cfg) -> dict:
  """FlaxRobertaModel loaded with _do_init=False needs every parameter: add the pooler."""
  tree["pooler"] = {"dense": pooler(cfg, int(cfg.seed))}
  return tree


def _write_tokenizer(cfg, workdir: str, out_dir: str):
  """Copies the run's tokenizer files into out_dir; returns the tokenizer loaded from there."""
  # (transformers: see hf_config)
  from transformers import AutoTokenizer
  src = cfg.data.tokenizer or os.path.join(sources.local_dir(workdir), "tokenizer")
  if os.path.isdir(src):
    for name in sorted(os.listdir(src)):
      path = os.path.join(src, name)
      if (os.path.isfile(path) and name not in _NOT_TOKENIZER and not name.startswith(".")
          and not name.endswith(_WEIGHT_SUFFIXES)):
        shutil.copy2(path, os.path.join(out_dir, name))
  elif cfg.data.tokenizer:
    # a hub name: save what transformers resolves (needs it in the local cache or network)
    AutoTokenizer.from_pretrained(src).save_pretrained(out_dir)
  else:
    raise ValueError(f"no tokenizer at {src} (the text data pipeline writes it there); set "
                     "--config.data.tokenizer to the tokenizer used for training")
  tok = AutoTokenizer.from_pretrained(out_dir)
  pad = tok.pad_token_id
  if pad != cfg.model.pad_id:
    raise ValueError(f"tokenizer {src} has pad_token_id={pad} but model.pad_id={cfg.model.pad_id}; "
                     "HF position ids would be wrong: export with the tokenizer used for training")
  return tok


def write_extra(cfg, out_dir: str, workdir: str):
  """The export's tokenizer files (from cfg.data.tokenizer, else WORKDIR/tokenizer) and the
  HF config with the tokenizer's own bos / eos / pad: <s> </s> <pad>, or [CLS] [SEP] [PAD] for
  a BERT vocabulary. `AutoModel.from_pretrained(out_dir)` gives Data2VecTextModel,
  `FlaxRobertaModel.from_pretrained(out_dir)` the Flax copy (a model-type warning only).

  Why no pooler in model.safetensors: pretraining never trains one, and the head classes that
  have none (ForMaskedLM, ForCausalLM, ForSequenceClassification, ForTokenClassification,
  ForQuestionAnswering) would report it as an unexpected weight. The classes that add one
  (Data2VecTextModel, ForMultipleChoice) list `pooler.dense.*` as newly initialised, as they do
  for the official data2vec-text / roberta checkpoints."""
  ids = text_data.special_ids(_write_tokenizer(cfg, workdir, out_dir))
  return hf_config(cfg, bos_id=ids["bos"], eos_id=ids["eos"])
