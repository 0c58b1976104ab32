"""Where a new run's weights start: fresh init, a Hugging Face directory, or another run.

  --config.init.hf=PATH          HF directory of the matching family (text: data2vec-text or
                                 roberta; vision: data2vec-vision or beit; audio: data2vec-audio)
  --config.init.checkpoint=DIR   run directory written by d2v_jax.train (latest checkpoint)

init.hf also fixes the architecture: `resolve_config(cfg)` (run by d2v_jax.config.validate,
so before anything is built, on every launch) copies the directory's config.json fields of
ARCH (text: num_hidden_layers, hidden_size, num_attention_heads, intermediate_size,
layer_norm_eps, max_position_embeddings, pad_token_id, type_vocab_size, vocab_size; vision and
audio: their shape fields) into model.*, and for text sets data.tokenizer to the directory
when it holds a tokenizer and data.tokenizer is empty. A key given on the command line that
contradicts config.json is a one-line ConfigError; target.top_k (and text data.block_size)
not given on the command line shrink to what the model allows.

Applied only when the run directory has no checkpoint (a resume ignores both keys). The trainer
calls `initial_params(cfg, built, built.init(cfg.seed))`:

* init.hf: `d2v_jax/hf/<modality>.load(PATH, cfg)` gives the `embed` and `encoder` subtrees;
  they replace the fresh ones (the regression head, a pretraining module HF never holds, keeps
  its fresh init). The HF config.json must be of the modality's family and agree with ours on
  what weight shapes cannot show (heads, activation, conv strides).
* init.checkpoint: the student params of DIR's latest checkpoint (head included). Its teacher,
  optimizer state, step and data position are not read.

Either way the teacher starts as a copy of the new student's EMA subtrees
(cfg.teacher.ema_subtrees), the optimizer state is a fresh `tx.init`, the step is 0, and
everything is placed with built.state_shardings. A tree or shape mismatch raises ConfigError
naming the first mismatching weight.

A Hugging Face directory -> run directory, without a training step (then d2v_jax.export, or
continued pretraining with the same --config.init.hf):

  python -m d2v_jax.init --hf HF_DIR --workdir RUN_DIR [--config configs/text.py:variant=base]
      [--config.KEY=VALUE ...]

writes RUN_DIR/config.json and a checkpoint at step 0 holding the imported weights (the
regression head freshly initialised); --config defaults to the modality's file, picked by
config.json's model_type.
"""

from __future__ import annotations

import json
import os
import sys

from d2v_jax import console  # noqa: F401  (before jax / TF: quiet console)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from d2v_jax import config as config_lib, ema  # noqa: E402

# config.json model_type values a modality can import.
FAMILIES = {
    "text": ("data2vec-text", "roberta"),
    "vision": ("data2vec-vision", "beit"),
    "audio": ("data2vec-audio",),
}
# HF config fields that no weight shape reveals; a difference would silently change the model.
STRUCTURAL = ("num_attention_heads", "hidden_act", "position_embedding_type", "conv_stride",
              "feat_extract_activation")
# Fields whose difference only changes numerics slightly: a warning.
NUMERIC = ("layer_norm_eps",)

_ENCODER = (("num_hidden_layers", "model.encoder.num_layers"), ("hidden_size", "model.encoder.hidden"),
            ("num_attention_heads", "model.encoder.heads"),
            ("intermediate_size", "model.encoder.mlp_dim"),
            ("layer_norm_eps", "model.encoder.layer_norm_eps"))
# config.json field -> our key: the architecture an init.hf directory fixes (resolve_config).
ARCH = {
    "text": _ENCODER + (("max_position_embeddings", "model.max_positions"),
                        ("pad_token_id", "model.pad_id"), ("type_vocab_size", "model.type_vocab"),
                        ("vocab_size", "model.vocab_size")),
    "vision": _ENCODER + (("image_size", "model.image_size"), ("patch_size", "model.patch_size"),
                          ("num_channels", "model.channels"),
                          ("layer_scale_init_value", "model.encoder.layer_scale")),
    "audio": _ENCODER + (("conv_dim", "model.conv_dims"), ("conv_stride", "model.conv_strides"),
                         ("conv_kernel", "model.conv_kernels"), ("conv_bias", "model.conv_bias"),
                         ("num_conv_pos_embeddings", "model.pos_conv_depth"),
                         ("conv_pos_kernel_size", "model.pos_conv_kernel"),
                         ("num_conv_pos_embedding_groups", "model.pos_conv_groups")),
}
MODALITY_OF = {family: m for m, families in FAMILIES.items() for family in families}
# Files that make a directory a tokenizer directory (text: data.tokenizer defaults to init.hf).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer_config.json")


def init_keys(cfg) -> tuple[str, str]:
  """(init.hf, init.checkpoint); both empty when the config has no `init` block."""
  node = cfg.get("init", None)
  if node is None:
    return "", ""
  return str(node.get("hf", "") or ""), str(node.get("checkpoint", "") or "")


def _get(cfg, key: str):
  node = cfg
  for k in key.split("."):
    node = node[k]
  return node


def _same(a, b) -> bool:
  a, b = _norm(a), _norm(b)
  if isinstance(a, float) or isinstance(b, float):
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= 1e-12 * max(abs(a), abs(b), 1)
  return a == b


def _typed(value, like):
  """config.json value in the type of our key (tuples stay tuples, ints ints)."""
  if isinstance(like, tuple) or isinstance(value, list):
    return tuple(value)
  if isinstance(like, bool):
    return bool(value)
  if isinstance(like, float):
    return float(value)
  return value


def resolve_config(cfg) -> None:
  """Takes the architecture from init.hf's config.json (see module doc); a no-op without
  init.hf, for a config already resolved, or for a saved run config (config.mark_resolved).
  Raises ConfigError when a command-line key contradicts config.json."""
  hf_path, _ = init_keys(cfg)
  if not hf_path or getattr(cfg, "_d2v_hf_resolved", None) == hf_path:
    return
  if config_lib.is_resolved(cfg):
    return
  modality = cfg.get("modality", "")
  hf_json = check_family(hf_path, modality)
  if hf_json is None or modality not in ARCH:
    return
  explicit = config_lib.explicit_keys(cfg)
  changed, fixed = [], []
  for field, key in ARCH[modality]:
    value = hf_json.get(field)
    if value is None:
      continue
    ours = _get(cfg, key)
    if key in explicit and not _same(ours, value):
      raise config_lib.ConfigError(
          f"--config.{key}={_norm(ours)!r} contradicts init.hf={hf_path!r} (config.json {field}="
          f"{_norm(value)!r}); drop the flag: the architecture comes from the weights")
    if not _same(ours, value):
      config_lib.set_path(cfg, key, _typed(value, ours))
      changed.append(f"{key}={_norm(value)}")
    fixed.append(key)
  layers = int(cfg.model.encoder.num_layers)
  if cfg.target.top_k > layers and "target.top_k" not in explicit:
    cfg.target.top_k = layers
    changed.append(f"target.top_k={layers}")
  if modality == "text":
    if not cfg.data.get("tokenizer", "") and "data.tokenizer" not in explicit and any(
        os.path.exists(os.path.join(hf_path, f)) for f in TOKENIZER_FILES):
      cfg.data.tokenizer = hf_path
      changed.append(f"data.tokenizer={hf_path}")
    room = int(cfg.model.max_positions) - int(cfg.model.pad_id) - 1
    if cfg.data.block_size > room and "data.block_size" not in explicit:
      cfg.data.block_size = room
      changed.append(f"data.block_size={room}")
  config_lib.mark_explicit(cfg, fixed)   # the tokenizer / data prepare must not override them
  object.__setattr__(cfg, "_d2v_hf_resolved", hf_path)
  if changed and jax.process_index() == 0:
    print(f"init.hf={hf_path}: {', '.join(changed)} (from its config.json)", flush=True)


def initial_params(cfg, built, state):
  """`state` (fresh from built.init) with params from init.hf / init.checkpoint, if set."""
  hf_path, run_dir = init_keys(cfg)
  if hf_path and run_dir:
    raise config_lib.ConfigError("init.hf and init.checkpoint are both set; choose one")
  if not hf_path and not run_dir:
    return state
  if hf_path:
    loaded = load_hf(hf_path, cfg, built.modality)
    params = overlay(state.params, loaded, built.state_shardings.params, f"init.hf={hf_path}")
    source = f"Hugging Face directory {hf_path} ({', '.join(sorted(loaded))})"
  else:
    params = load_run_params(run_dir, cfg, built)
    source = f"run {run_dir} (student params)"
  state = fresh_state(params, state, built, cfg)
  if jax.process_index() == 0:
    print(f"initialised from {source}; teacher = student, fresh optimizer, step 0", flush=True)
  return state


# ----------------------------------------------------------------------------- init.hf


def _read_hf_config(path: str) -> dict | None:
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    return None
  with open(cfg_path) as f:
    return json.load(f)


def check_family(path: str, modality: str) -> dict | None:
  """Raises ConfigError unless PATH is an HF directory of the modality's family."""
  if not os.path.isdir(path):
    raise config_lib.ConfigError(f"init.hf={path!r} is not a directory; give a Hugging Face model "
                                 "directory (config.json + model.safetensors)")
  hf_json = _read_hf_config(path)
  families = FAMILIES.get(modality)
  if hf_json is None or families is None:
    return hf_json  # no config.json: the weight map's own prefix / shape checks decide
  model_type = hf_json.get("model_type", "?")
  if model_type not in families:
    raise config_lib.ConfigError(
        f"init.hf={path!r} holds a {model_type!r} model (config.json model_type); a {modality} run "
        f"imports {' or '.join(families)}")
  return hf_json


def check_structure(path: str, hf_json: dict, cfg, hf_map) -> None:
  """Compares the HF config fields no weight shape reveals with what our config exports."""
  if not hasattr(hf_map, "hf_config"):
    return
  ours = hf_map.hf_config(cfg).to_dict()
  for key in STRUCTURAL:
    if key in hf_json and key in ours and _norm(hf_json[key]) != _norm(ours[key]):
      raise config_lib.ConfigError(
          f"init.hf={path!r}: config.json {key}={hf_json[key]!r} but this config has "
          f"{ours[key]!r}; set the matching model.* keys (e.g. model.encoder.heads) to import it")
  for key in NUMERIC:
    if key in hf_json and key in ours and _norm(hf_json[key]) != _norm(ours[key]):
      print(f"warning: init.hf={path}: config.json {key}={hf_json[key]} but this config uses "
            f"{ours[key]}", file=sys.stderr, flush=True)


def _norm(v):
  return list(v) if isinstance(v, (list, tuple)) else v


def load_hf(path: str, cfg, modality) -> dict:
  """HF directory -> {'embed', 'encoder'} host arrays in our layout (family checked)."""
  hf_json = check_family(path, modality.name)
  hf_map = modality.hf()
  if hf_json is not None:
    check_structure(path, hf_json, cfg, hf_map)
  try:
    return hf_map.load(path, cfg)
  except (ValueError, FileNotFoundError) as e:
    raise config_lib.ConfigError(f"init.hf={path!r}: {e}") from None


# ------------------------------------------------------------------------ tree helpers


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def check_tree(want, got, where: str, prefix: str = "") -> None:
  """Raises ConfigError naming the first leaf whose presence or shape differs."""
  w = {_path_str(p): np.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(want)[0]}
  g = {_path_str(p): np.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(got)[0]}
  for name in sorted(set(w) | set(g)):
    if name not in g:
      raise config_lib.ConfigError(f"{where}: weight {prefix}{name} (shape {w[name]}) is missing")
    if name not in w:
      raise config_lib.ConfigError(f"{where}: weight {prefix}{name} (shape {g[name]}) has no place "
                                   "in this model")
    if w[name] != g[name]:
      raise config_lib.ConfigError(f"{where}: weight {prefix}{name} has shape {g[name]} but this "
                                   f"config expects {w[name]}")


def _place(x, sharding) -> jax.Array:
  """Host array -> global jax.Array; each process fills only its own shards (multi-host safe)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def overlay(params: dict, loaded: dict, shardings: dict, where: str) -> dict:
  """params with the subtrees of `loaded` (host arrays) placed in, after a tree / shape check."""
  out = dict(params)
  for key, sub in loaded.items():
    if key not in params:
      raise config_lib.ConfigError(f"{where}: subtree {key!r} is not in this model ({sorted(params)})")
    check_tree(params[key], sub, where, prefix=f"{key}/")
    out[key] = jax.tree_util.tree_map(
        lambda x, s, ref: _place(np.asarray(x, dtype=ref.dtype), s), sub, shardings[key], params[key])
  return out


def fresh_state(params: dict, state, built, cfg):
  """TrainState at step 0: these params, teacher = their EMA subtrees, fresh optimizer state.

  One jitted copy gives the teacher its own buffers (the step donates the state, so student
  and teacher must never share one)."""
  sh = built.state_shardings
  subtrees = tuple(cfg.teacher.ema_subtrees)

  def make(p):
    teacher = ema.teacher_view(p, subtrees)
    return p, jax.tree_util.tree_map(lambda x: x, teacher), built.tx.init(p)

  params, teacher, opt_state = jax.jit(make, out_shardings=(sh.params, sh.teacher, sh.opt_state))(params)
  zero = jax.device_put(np.zeros((), np.int32), sh.step)
  return state.replace(step=zero, params=params, teacher=teacher, opt_state=opt_state)


# ---------------------------------------------------------------------- init.checkpoint


def load_run_params(run_dir: str, cfg, built) -> dict:
  """Student params of RUN_DIR's latest checkpoint, placed with built.state_shardings.params."""
  import orbax.checkpoint as ocp

  from d2v_jax import checkpoint

  where = f"init.checkpoint={run_dir}"
  try:
    step, meta = checkpoint.read_meta(run_dir)
  except checkpoint.NoCheckpoint as e:
    raise config_lib.ConfigError(f"{where}: {e}") from None
  if meta.get("modality") != cfg.modality:
    raise config_lib.ConfigError(f"{where} is a {meta.get('modality')!r} run; this run is "
                                 f"{cfg.modality!r}")
  ckpt_dir = os.path.join(os.path.abspath(run_dir), "checkpoints")
  tree = ocp.PyTreeCheckpointer().metadata(os.path.join(ckpt_dir, str(step), "state"))
  tree = getattr(tree, "item_metadata", tree)
  tree = getattr(tree, "tree", tree)
  check_tree(built.abstract_state.params, tree["params"], f"{where} (step {step})", prefix="params/")
  target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  built.abstract_state.params, built.state_shardings.params)
  restore_args = jax.tree_util.tree_map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), target)
  mngr = ocp.CheckpointManager(ckpt_dir, item_names=("state", "meta"))
  try:
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"params": target}, restore_args={"params": restore_args}, partial_restore=True)))
  finally:
    mngr.close()
  return out["state"]["params"]


# ---------------------------------------------------------------------- HF dir -> run dir


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model_keys_without_data(cfg, workdir: str, mod) -> None:
  """What prepare() resolves into the model config, without reading a corpus / data set."""
  if cfg.modality == "text":
    if not cfg.data.tokenizer:
      raise config_lib.ConfigError(
          f"init.hf={cfg.init.hf!r} holds no tokenizer; set --config.data.tokenizer to the "
          "tokenizer of these weights")
    mod.data.resolve_model_keys(cfg, mod.data.load_tokenizer(cfg.data.tokenizer))
  elif cfg.modality == "vision":
    mod.data.prepare(cfg, workdir)   # mask-count defaults only; reads no image


def write_run(cfg, workdir: str) -> int:
  """init.hf (or init.checkpoint) of cfg -> WORKDIR/config.json + a checkpoint at step 0.
  Refuses a run directory that already holds a checkpoint. Returns the step written (0)."""
  from d2v_jax import build as build_lib, checkpoint
  from d2v_jax.modality import load as load_modality

  if not any(init_keys(cfg)):
    raise config_lib.ConfigError("nothing to import: set --hf DIR (init.hf) or init.checkpoint")
  try:
    step, _ = checkpoint.read_meta(workdir)
  except checkpoint.NoCheckpoint:
    step = None
  if step is not None:
    raise config_lib.ConfigError(f"{workdir} already holds a checkpoint (step {step}); choose "
                                 "another --workdir")
  config_lib.validate(cfg)        # resolves the architecture from init.hf
  mod = load_modality(cfg.modality)
  _model_keys_without_data(cfg, workdir, mod)
  built = build_lib.build(cfg)
  state = initial_params(cfg, built, built.init(cfg.seed))
  os.makedirs(workdir, exist_ok=True)
  mngr = checkpoint.manager(workdir, async_save=False)
  try:
    checkpoint.save(mngr, 0, state, {"step": 0, "data_position": 0, "modality": cfg.modality,
                                     "config": config_lib.to_dict(cfg)})
    mngr.wait_until_finished()
  finally:
    mngr.close()
  if jax.process_index() == 0:
    config_lib.write_resolved(cfg, workdir)
  return 0


def _default_config(hf_path: str) -> str:
  hf_json = _read_hf_config(hf_path) if os.path.isdir(hf_path) else None
  if hf_json is None:
    raise config_lib.ConfigError(f"--hf {hf_path!r} has no config.json; pass --config "
                                 "configs/<modality>.py")
  modality = MODALITY_OF.get(hf_json.get("model_type", "?"))
  if modality is None:
    raise config_lib.ConfigError(f"--hf {hf_path!r} holds a {hf_json.get('model_type')!r} model; "
                                 f"importable: {sorted(MODALITY_OF)}")
  return os.path.join(ROOT, "configs", f"{modality}.py")


def main(argv=None) -> None:
  import argparse

  from absl import flags

  argv = list(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(prog="python -m d2v_jax.init",
                              description="Hugging Face directory -> run directory (step 0)")
  p.add_argument("--hf", required=True, help="HF model directory (config.json + weights)")
  p.add_argument("--workdir", required=True, help="run directory to write")
  p.add_argument("--config", default=None,
                 help="config file[:args] (default: configs/<modality>.py of the weights)")
  a, rest = p.parse_known_args(argv)
  bad = [r for r in rest if not r.startswith("--config.")]
  if bad:
    p.error(f"unknown arguments {bad}")
  try:
    spec = a.config or _default_config(a.hf)
    fv = config_lib.parse_argv([p.prog, "--config", spec, f"--config.init.hf={a.hf}", *rest],
                               flags.FlagValues())
    cfg = fv.config
    write_run(cfg, a.workdir)
  except config_lib.ConfigError as e:
    config_lib.die(str(e))
  if jax.process_index() == 0:
    print(f"wrote {os.path.abspath(a.workdir)}: checkpoint step 0 = {a.hf} "
          f"({cfg.model.encoder.num_layers} layers x {cfg.model.encoder.hidden}), no training "
          f"step; export: python -m d2v_jax.export --workdir {a.workdir} --out OUT", flush=True)


if __name__ == "__main__":
  main()
