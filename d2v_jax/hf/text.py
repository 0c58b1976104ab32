"""data2vec-text <-> Hugging Face `Data2VecTextModel` / `FlaxRobertaModel` (ALGORITHM.md §5.1, §5.4).

Our encoder is a post-LN RoBERTa, so the map is one-to-one (fairseq -> HF conversion names):

  embed/{word,position,token_type}/embedding   embeddings.{word,position,token_type}_embeddings.weight
  embed/norm/{scale,bias}                      embeddings.LayerNorm.{weight,bias}
  block/attention/{query,key,value}            encoder.layer.i.attention.self.{query,key,value}
  block/attention/out                          encoder.layer.i.attention.output.dense
  block/attn_norm                              encoder.layer.i.attention.output.LayerNorm
  block/fc1, block/fc2                         encoder.layer.i.intermediate.dense, .output.dense
  block/mlp_norm                               encoder.layer.i.output.LayerNorm

Dense kernels are (in, out) = torch weight.T. `params['head']` (the data2vec regression head)
is a pretraining module and is not exported, as in the fairseq -> HF conversion.
"""

from __future__ import annotations

import os
import shutil

import flax
import numpy as np

from d2v_jax import config as config_lib
from d2v_jax.hf import common

FAMILIES = ("data2vec-text", "roberta")          # config.json model_type values we import
ARCH = common.ENCODER_ARCH + (("max_position_embeddings", "model.max_positions"),
                              ("pad_token_id", "model.pad_id"), ("type_vocab_size", "model.type_vocab"),
                              ("vocab_size", "model.vocab_size"))
PREFIXES = ("data2vec_text.", "roberta.", "")  # Data2VecText*, Roberta* heads, base model
# Files that make a directory a tokenizer directory (init.hf: data.tokenizer defaults to it).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer_config.json")

# (HF module name, our path inside a block, kind); kind picks the leaf names.
BLOCK_MAP = (
    ("attention.self.query", ("attention", "query"), "dense"),
    ("attention.self.key", ("attention", "key"), "dense"),
    ("attention.self.value", ("attention", "value"), "dense"),
    ("attention.output.dense", ("attention", "out"), "dense"),
    ("attention.output.LayerNorm", ("attn_norm",), "norm"),
    ("intermediate.dense", ("fc1",), "dense"),
    ("output.dense", ("fc2",), "dense"),
    ("output.LayerNorm", ("mlp_norm",), "norm"),
)
EMBED_MAP = (
    ("embeddings.word_embeddings", ("word",), "embed"),
    ("embeddings.position_embeddings", ("position",), "embed"),
    ("embeddings.token_type_embeddings", ("token_type",), "embed"),
    ("embeddings.LayerNorm", ("norm",), "norm"),
)
# (torch suffix, flax leaf, transpose)
LEAVES = {
    "dense": (("weight", "kernel", True), ("bias", "bias", False)),
    "norm": (("weight", "scale", False), ("bias", "bias", False)),
    "embed": (("weight", "embedding", False),),
}


def _check_representable(cfg) -> None:
  m, enc = cfg.model, cfg.model.encoder
  if m.vocab_size is None:
    raise config_lib.ConfigError(
        "model.vocab_size is unset: run d2v_jax.data.text.prepare (reads the tokenizer) or pass "
        "--config.model.vocab_size")
  bad = [(enc.pre_ln, "model.encoder.pre_ln=True"), (enc.layer_scale > 0, "model.encoder.layer_scale>0"),
         (not enc.key_bias, "model.encoder.key_bias=False"), (enc.input_norm, "model.encoder.input_norm=True"),
         (enc.final_norm, "model.encoder.final_norm=True")]
  for is_bad, what in bad:
    if is_bad:
      raise config_lib.ConfigError(
          f"{what} has no Data2VecText/RoBERTa equivalent (post-LN, k-bias, no extra norms); "
          "use the configs/text.py encoder settings to export to Hugging Face")


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


def hf_config(cfg, bos_id: int = 0, eos_id: int = 2):
  """transformers.Data2VecTextConfig for our text model (conversion-script values: 514/1/1e-5).
  bos / eos default to RoBERTa's <s>=0 / </s>=2; export() passes the tokenizer's own."""
  from transformers import Data2VecTextConfig
  _check_representable(cfg)
  m, enc = cfg.model, cfg.model.encoder
  return Data2VecTextConfig(
      vocab_size=m.vocab_size, hidden_size=enc.hidden, num_hidden_layers=enc.num_layers,
      num_attention_heads=enc.heads, intermediate_size=enc.mlp_dim, hidden_act="gelu",
      hidden_dropout_prob=enc.dropout, attention_probs_dropout_prob=enc.attention_dropout,
      max_position_embeddings=m.max_positions, type_vocab_size=m.type_vocab,
      initializer_range=0.02, layer_norm_eps=enc.layer_norm_eps, pad_token_id=m.pad_id,
      bos_token_id=int(bos_id), eos_token_id=int(eos_id), position_embedding_type="absolute")


_get, _put = common.get_path, common.put_path


def _module_to_torch(hf_name: str, sub: dict, kind: str, out: dict) -> None:
  for suffix, leaf, transpose in LEAVES[kind]:
    x = np.asarray(sub[leaf], dtype=np.float32)
    out[f"{hf_name}.{suffix}"] = x.T if transpose else x


def to_hf_state(params, cfg, seed: int = 0, pooler: bool = True) -> dict[str, np.ndarray]:
  """Our params (scanned or unscanned layers, boxed or not) -> Data2VecTextModel state dict.

  Names carry no prefix (base model). We never train a pooler; with `pooler=True`
  `pooler.dense` is added freshly initialised the way HF would (weight ~ N(0, 0.02) seeded by
  `seed`, bias 0) for consumers that need a complete base-model tree (FlaxRobertaModel with
  _do_init=False). Do not read meaning into pooler_output.
  """
  params = common.unbox(params)
  out: dict[str, np.ndarray] = {}
  for hf_name, path, kind in EMBED_MAP:
    _module_to_torch(hf_name, _get(params["embed"], path), kind, out)
  for i, block in enumerate(common.layer_list(params["encoder"])):
    for hf_name, path, kind in BLOCK_MAP:
      _module_to_torch(f"encoder.layer.{i}.{hf_name}", _get(block, path), kind, out)
  if not pooler:
    return out
  h = cfg.model.encoder.hidden
  rng = np.random.default_rng(seed)
  out["pooler.dense.weight"] = rng.normal(0.0, 0.02, (h, h)).astype(np.float32)
  out["pooler.dense.bias"] = np.zeros((h,), np.float32)
  return out


def expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
  """Torch names and shapes of the base model weights we read (pooler excluded)."""
  m, enc = cfg.model, cfg.model.encoder
  d, f = enc.hidden, enc.mlp_dim
  dense_shapes = {"attention.self.query": (d, d), "attention.self.key": (d, d),
                  "attention.self.value": (d, d), "attention.output.dense": (d, d),
                  "intermediate.dense": (f, d), "output.dense": (d, f)}
  out = {"embeddings.word_embeddings.weight": (m.vocab_size, d),
         "embeddings.position_embeddings.weight": (m.max_positions, d),
         "embeddings.token_type_embeddings.weight": (m.type_vocab, d),
         "embeddings.LayerNorm.weight": (d,), "embeddings.LayerNorm.bias": (d,)}
  for i in range(enc.num_layers):
    for hf_name, _, kind in BLOCK_MAP:
      name = f"encoder.layer.{i}.{hf_name}"
      if kind == "dense":
        out[f"{name}.weight"] = dense_shapes[hf_name]
        out[f"{name}.bias"] = (dense_shapes[hf_name][0],)
      else:
        out[f"{name}.weight"] = out[f"{name}.bias"] = (d,)
  return out


def _strip_prefix(state: dict) -> dict:
  return common.strip_prefix(state, "embeddings.word_embeddings.weight", PREFIXES, "Data2VecText/RoBERTa")


def _module_from_torch(state: dict, hf_name: str, kind: str) -> dict:
  out = {}
  for suffix, leaf, transpose in LEAVES[kind]:
    x = np.asarray(state[f"{hf_name}.{suffix}"], dtype=np.float32)
    out[leaf] = x.T if transpose else x
  return out


def from_hf_state(state: dict, cfg) -> dict:
  """Data2VecText / RoBERTa state dict (prefixed or bare) -> {'embed', 'encoder'} in our layout.

  Layers are stacked when cfg.model.encoder.scan, else one `layers_i` subtree each. Pooler,
  LM / classification heads and position-id buffers are ignored. A missing weight or one whose
  shape disagrees with cfg raises ValueError naming the first such weight.
  """
  _check_representable(cfg)
  state = _strip_prefix(state)
  deeper = f"encoder.layer.{cfg.model.encoder.num_layers}.attention.self.query.weight"
  if deeper in state:
    raise ValueError(f"HF weight {deeper!r} exists: the checkpoint is deeper than "
                     f"model.encoder.num_layers={cfg.model.encoder.num_layers}")
  for name, want in expected_shapes(cfg).items():
    if name not in state:
      raise ValueError(f"HF state dict lacks {name!r} (expected shape {want}); it does not match "
                       f"model.encoder.num_layers={cfg.model.encoder.num_layers} or is not a RoBERTa encoder")
    got = tuple(np.shape(state[name]))
    if got != want:
      raise ValueError(f"HF weight {name!r} has shape {got} but the config expects {want} "
                       "(check model.vocab_size / max_positions / type_vocab / encoder sizes)")
  embed: dict = {}
  for hf_name, path, kind in EMBED_MAP:
    _put(embed, path, _module_from_torch(state, hf_name, kind))
  layers = []
  for i in range(cfg.model.encoder.num_layers):
    block: dict = {}
    for hf_name, path, kind in BLOCK_MAP:
      _put(block, path, _module_from_torch(state, f"encoder.layer.{i}.{hf_name}", kind))
    layers.append(block)
  encoder = common.set_layers({}, layers, cfg.model.encoder.scan)
  return {"embed": embed, "encoder": encoder}


def flax_roberta_params(state: dict[str, np.ndarray]) -> dict:
  """Bare Data2VecText state dict -> FlaxRobertaModel param tree (same dotted names, Flax leaves)."""
  tree: dict = {}
  for name, x in state.items():
    *path, suffix = name.split(".")
    if path[-1].endswith("_embeddings"):
      leaf = "embedding"
    elif path[-1] == "LayerNorm":
      leaf = "scale" if suffix == "weight" else "bias"
    elif suffix == "weight":  # Linear: Flax kernel is (in, out)
      leaf, x = "kernel", x.T
    else:
      leaf = "bias"
    _put(tree, (*path, leaf), np.ascontiguousarray(x, dtype=np.float32))
  return tree


_NOT_TOKENIZER = {"config.json", "model.safetensors", "pytorch_model.bin", "flax_model.msgpack",
                  "d2v_config.json", "tf_model.h5", "generation_config.json", "d2v_export.json",
                  "README.md"}
# Weights (sharded ones and their index included) of a model directory used as data.tokenizer
# (init.hf): never copied with the tokenizer.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".msgpack", ".h5", ".index.json", ".onnx", ".pt",
                    ".ckpt", ".pth")


def _default_tokenizer_dir(workdir: str) -> str:
  """Where d2v_jax.data.text trains the tokenizer: WORKDIR/tokenizer (a local temp dir keyed
  by the workdir when the workdir is remote)."""
  from d2v_jax.data.text import _local_dir
  return os.path.join(_local_dir(workdir), "tokenizer")


def _write_tokenizer(cfg, workdir: str, out_dir: str):
  """Copies the run's tokenizer files into out_dir; returns the tokenizer loaded from there."""
  src = cfg.data.get("tokenizer", "") or _default_tokenizer_dir(workdir)
  from transformers import AutoTokenizer
  if os.path.isdir(src):
    for name in sorted(os.listdir(src)):
      path = os.path.join(src, name)
      if (os.path.isfile(path) and name not in _NOT_TOKENIZER and not name.startswith(".")
          and not name.endswith(_WEIGHT_SUFFIXES)):
        shutil.copy2(path, os.path.join(out_dir, name))
  elif cfg.data.get("tokenizer", ""):
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


def export(params, cfg, out_dir: str, workdir: str) -> None:
  """Writes a Hugging Face directory for our text model.

  out_dir/: config.json (Data2VecTextConfig, architectures ["Data2VecTextModel"]; bos / eos /
  pad ids are the tokenizer's own: <s> </s> <pad>, or [CLS] [SEP] [PAD] for a BERT vocabulary),
  model.safetensors (PyTorch names, float32, no pooler), the tokenizer files (from
  cfg.data.tokenizer, else WORKDIR/tokenizer), d2v_config.json (the resolved training config),
  and flax_model.msgpack: the same weights as a FlaxRobertaModel tree plus a freshly
  initialised pooler (see to_hf_state).
  `AutoModel.from_pretrained(out_dir)` gives Data2VecTextModel, `FlaxRobertaModel.from_pretrained(
  out_dir)` the Flax copy (it reads the data2vec-text config.json with a model-type warning only;
  the two configs share every field FlaxRoberta reads).

  Why no pooler in model.safetensors: pretraining never trains one, and the head classes that
  have none (ForMaskedLM, ForCausalLM, ForSequenceClassification, ForTokenClassification,
  ForQuestionAnswering) would report it as an unexpected weight. The classes that add one
  (Data2VecTextModel, ForMultipleChoice) list `pooler.dense.*` as newly initialised, as they do
  for the official data2vec-text / roberta checkpoints. FlaxRobertaModel loaded with
  _do_init=False needs every parameter, so the msgpack keeps a pooler.
  """
  from d2v_jax.data.text import special_ids
  os.makedirs(out_dir, exist_ok=True)
  ids = special_ids(_write_tokenizer(cfg, workdir, out_dir))
  hf_cfg = hf_config(cfg, bos_id=ids["bos"], eos_id=ids["eos"])
  hf_cfg.architectures = ["Data2VecTextModel"]
  state = to_hf_state(params, cfg, seed=int(cfg.seed))
  hf_cfg.save_pretrained(out_dir)
  common.save_state_dict({k: v for k, v in state.items() if not k.startswith("pooler.")}, out_dir)
  with open(os.path.join(out_dir, "flax_model.msgpack"), "wb") as f:
    f.write(flax.serialization.msgpack_serialize(flax_roberta_params(state)))
  common.write_json(config_lib.to_dict(cfg), os.path.join(out_dir, "d2v_config.json"))


def load(path: str, cfg) -> dict:
  """HF directory (model.safetensors or pytorch_model.bin) -> {'embed', 'encoder'} params."""
  return from_hf_state(common.load_state_dict(path), cfg)
