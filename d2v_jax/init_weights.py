"""Where a new run's weights start: fresh init, a Hugging Face directory, or another run.

  --config.init.hf=PATH          HF directory of the modality's family (hf/<modality>.py
                                 FAMILIES: text data2vec-text or roberta; vision data2vec-vision
                                 or beit; audio data2vec-audio)
  --config.init.checkpoint=DIR   run directory written by d2v_jax.train (latest checkpoint)
  --config.init.fairseq=CKPT.pt  fairseq data2vec checkpoint (1.0 text / audio / vision port,
                                 2.0 text / audio / image): student, EMA teacher, head / decoder,
                                 and the architecture (d2v_jax/fairseq_io/load.py)

init.hf also fixes the architecture: `resolve_config(cfg)` (run by d2v_jax.resolve.settings,
so before anything is built, on every launch) copies the directory's config.json fields of the
modality's ARCH table (hf/<modality>.py: config.json field -> our key) into model.*, and for
text sets data.tokenizer to the directory when it holds a tokenizer and data.tokenizer is
empty. A key given on the command line that contradicts config.json is a one-line
ConfigError; target.top_k (and text data.block_size) not given on the command line shrink to
what the model allows.

Applied only when the run directory has no checkpoint (a resume ignores both keys). The trainer
calls `initial_params(cfg, built, built.init(cfg.seed))`:

* init.hf: `hf/common.load` with the modality's map gives the `embed` and `encoder` subtrees; they
  replace the fresh ones (the regression head, a pretraining module HF never holds, keeps its
  fresh init). The HF config.json must be of the modality's family and agree with ours on
  what weight shapes cannot show (heads, activation, conv strides).
* init.checkpoint: the student params of DIR's latest checkpoint (head included). Its teacher,
  optimizer state, step and data position are not read.

Either way the teacher starts as a copy of the new student's EMA subtrees
(cfg.teacher.ema_subtrees), the optimizer state is a fresh `tx.init`, the step is 0, and
everything is placed with built.state_shardings. A tree or shape mismatch raises ConfigError
naming the first mismatching weight. `python -m d2v_jax.init` (d2v_jax/init.py) writes such a
start as a run directory without training.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from d2v_jax import checkpoint, config as config_lib, ema
from d2v_jax.fairseq_io import load as fairseq_load
from d2v_jax.hf import common as hf_common
from d2v_jax.modality import load as load_modality

# HF config fields that no weight shape reveals; a difference would silently change the model.
STRUCTURAL = ("num_attention_heads", "hidden_act", "position_embedding_type", "conv_stride",
              "feat_extract_activation")
# Fields whose difference only changes numerics slightly: a warning.
NUMERIC = ("layer_norm_eps",)


def init_keys(cfg) -> tuple[str, str]:
  """(init.hf, init.checkpoint); empty strings when unset."""
  return str(cfg.init.hf or ""), str(cfg.init.checkpoint or "")


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
  Raises ConfigError when a command-line key contradicts config.json. init.fairseq resolves
  the same way from the checkpoint (fairseq_io/load.py)."""
  fairseq_load.resolve_config(cfg)
  hf_path, _ = init_keys(cfg)
  if not hf_path or config_lib.is_resolved(cfg):
    return
  hf_map = load_modality(cfg.modality).hf()
  hf_json = check_family(hf_path, cfg.modality, hf_map)
  if hf_json is None:
    return
  explicit = config_lib.explicit_keys(cfg)
  changed, fixed = [], []
  for field, key in hf_map.ARCH:
    value = hf_json.get(field)
    if value is None:
      continue
    ours = config_lib.get_path(cfg, key)
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
  if hasattr(hf_map, "resolve_config"):   # what else the directory fixes (text: its tokenizer)
    changed += hf_map.resolve_config(cfg, hf_path, explicit)
  config_lib.mark_explicit(cfg, fixed)   # the tokenizer / data prepare must not override them
  if changed and jax.process_index() == 0:
    print(f"init.hf={hf_path}: {', '.join(changed)} (from its config.json)", flush=True)


def initial_params(cfg, built, state):
  """`state` (fresh from built.init) with params from init.hf / init.checkpoint, if set."""
  hf_path, run_dir = init_keys(cfg)
  if hf_path and run_dir:
    raise config_lib.ConfigError("init.hf and init.checkpoint are both set; choose one")
  if cfg.init.fairseq:
    return _from_fairseq(cfg, built, state)
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


def _from_fairseq(cfg, built, state):
  """init.fairseq: student (head / decoder included) and, when the file has one, its EMA
  teacher; fresh optimizer, step 0."""
  path = str(cfg.init.fairseq)
  params, teacher = fairseq_load.load(cfg, hf_common.our_shapes(cfg))
  where = f"init.fairseq={path}"
  params = overlay(state.params, params, built.state_shardings.params, where)
  if teacher is not None:
    check_tree(state.teacher, teacher, f"{where} (teacher)", prefix="teacher/")
  state = fresh_state(params, state, built, cfg, teacher=teacher)
  if jax.process_index() == 0:
    print(f"initialised from fairseq checkpoint {path} (student, "
          f"{'EMA teacher' if teacher is not None else 'teacher = student'}), fresh optimizer, "
          "step 0", flush=True)
  return state


# ----------------------------------------------------------------------------- init.hf


def read_hf_config(path: str) -> dict | None:
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    return None
  try:
    with open(cfg_path) as f:
      out = json.load(f)
  except (OSError, ValueError) as e:   # e.g. a file that is not JSON (a truncated download)
    raise config_lib.ConfigError(f"{cfg_path} does not read as JSON ({str(e).splitlines()[0]}); "
                                 "it must be the model's Hugging Face config.json") from None
  if not isinstance(out, dict):
    raise config_lib.ConfigError(f"{cfg_path} holds no JSON object; it must be the model's "
                                 "Hugging Face config.json")
  return out


def check_family(path: str, modality: str, hf_map) -> dict | None:
  """Raises ConfigError unless PATH is an HF directory of the modality's family."""
  if not os.path.isdir(path):
    raise config_lib.ConfigError(f"init.hf={path!r} is not a directory; give a Hugging Face model "
                                 "directory (config.json + model.safetensors)")
  hf_json = read_hf_config(path)
  if hf_json is None:
    return None  # no config.json: the weight map's own prefix / shape checks decide
  model_type = hf_json.get("model_type", "?")
  if model_type not in hf_map.FAMILIES:
    raise config_lib.ConfigError(
        f"init.hf={path!r} holds a {model_type!r} model (config.json model_type); a {modality} run "
        f"imports {' or '.join(hf_map.FAMILIES)}")
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
  hf_map = modality.hf()
  hf_json = check_family(path, modality.name, hf_map)
  if hf_json is not None:
    check_structure(path, hf_json, cfg, hf_map)
  try:
    return hf_common.load(hf_map, path, cfg)
  except (ValueError, FileNotFoundError) as e:
    raise config_lib.ConfigError(f"init.hf={path!r}: {e}") from None
  except Exception as e:   # a truncated / corrupt weights file: safetensors' or torch's own error
    text = str(e).splitlines()[0] if str(e).strip() else ""
    raise config_lib.ConfigError(f"init.hf={path!r}: its weights do not read ({type(e).__name__}: "
                                 f"{text}); download them again") from None


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


def fresh_state(params: dict, state, built, cfg, teacher: dict | None = None):
  """TrainState at step 0: these params, teacher = their EMA subtrees (or `teacher`, host
  arrays), fresh optimizer state.

  One jitted copy gives the teacher its own buffers (the step donates the state, so student
  and teacher must never share one)."""
  sh = built.state_shardings
  subtrees = tuple(cfg.teacher.ema_subtrees)

  def make(p):
    teacher = ema.teacher_view(p, subtrees)
    return p, jax.tree_util.tree_map(lambda x: x, teacher), built.tx.init(p)

  params, own, opt_state = jax.jit(make, out_shardings=(sh.params, sh.teacher, sh.opt_state))(params)
  teacher = own if teacher is None else jax.tree_util.tree_map(
      lambda x, s, ref: _place(np.asarray(x, dtype=ref.dtype), s), teacher, sh.teacher, own)
  zero = jax.device_put(np.zeros((), np.int32), sh.step)
  return state.replace(step=zero, params=params, teacher=teacher, opt_state=opt_state)


# ---------------------------------------------------------------------- init.checkpoint


def load_run_params(run_dir: str, cfg, built) -> dict:
  """Student params of RUN_DIR's latest checkpoint, placed with built.state_shardings.params."""
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
