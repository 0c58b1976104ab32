"""Config files and `--config.KEY=VALUE` overrides, with one-line errors.

Parsing and type conversion are ml_collections' `config_flags`; this module only turns its
tracebacks (unknown key, wrong type) into a message that names the key, checks values that
are in range for the chosen model, and writes the resolved config next to the run.
parse_argv also records which keys the command line set (explicit_keys): values resolved
later from a tokenizer (text model.pad_id / vocab_size) or an init.hf directory (the
architecture, d2v_jax/init.py) never overwrite them; a contradiction is a one-line error.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags


class ConfigError(ValueError):
  """A config problem the user must fix; the message says what and how."""


def load_file(spec: str) -> ml_collections.ConfigDict:
  """`configs/text.py:variant=tiny` -> ConfigDict (no overrides)."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise ConfigError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location("_d2v_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  try:
    return module.get_config(arg or None)
  except (ValueError, KeyError) as e:
    raise ConfigError(f"config {spec!r}: {e}") from None


def _unknown_key(cfg: ml_collections.ConfigDict, argv: list[str]) -> str | None:
  for a in argv:
    if not a.startswith("--config."):
      continue
    key = a[len("--config."):].split("=", 1)[0]
    node = cfg
    for i, part in enumerate(key.split(".")):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        where = ".".join(key.split(".")[:i]) or "<top>"
        valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        return f"unknown config key {key!r} (no {part!r} under {where}; valid there: {valid})"
      node = node[part]
  return None


def parse_argv(argv: list[str], fv: flags.FlagValues | None = None) -> flags.FlagValues:
  """Parses argv into `fv` (the absl flags), turning config errors into ConfigError."""
  fv = flags.FLAGS if fv is None else fv   # (an empty FlagValues is falsy: no `or` here)
  if "config" not in fv:
    config_flags.DEFINE_config_file("config", None, "config file[:args]", flag_values=fv,
                                   sys_argv=argv)  # overrides come from argv, not sys.argv
  try:
    fv(argv)
  except flags.Error as e:
    raise ConfigError(str(e).splitlines()[0]) from None
  except (AttributeError, KeyError) as e:
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None and "--config" in argv:
      spec = argv[argv.index("--config") + 1]
    msg = _unknown_key(load_file(spec), argv) if spec else None
    raise ConfigError(msg or f"bad config override: {e}") from None
  if fv.config is None:
    raise ConfigError("--config is required, e.g. --config configs/text.py:variant=tiny,runlocal")
  mark_explicit(fv.config, override_keys(argv))
  return fv


def override_keys(argv: list[str]) -> list[str]:
  """Dotted keys of the `--config.KEY=VALUE` / `--config.KEY VALUE` flags in argv."""
  return [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]


def mark_explicit(cfg: ml_collections.ConfigDict, keys) -> None:
  """Records which keys the user set (command line); values resolved later from a tokenizer
  or an init.hf directory never overwrite them, and a contradiction is an error. Kept as an
  attribute of the ConfigDict object (not a config key), so it is not written anywhere."""
  object.__setattr__(cfg, "_d2v_explicit", frozenset(explicit_keys(cfg)) | frozenset(keys))


def explicit_keys(cfg) -> frozenset:
  """Keys set on the command line (parse_argv / mark_explicit); empty for configs built in code."""
  return getattr(cfg, "_d2v_explicit", None) or frozenset()


def mark_resolved(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Marks a config read back from a run (config.json, checkpoint meta): its values were
  resolved when the run started, so nothing is resolved again (e.g. from an init.hf directory
  that may be gone by now)."""
  object.__setattr__(cfg, "_d2v_resolved", True)
  return cfg


def is_resolved(cfg) -> bool:
  return bool(getattr(cfg, "_d2v_resolved", False))


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Range checks that hold for every modality; modalities add their own. First resolves what
  an init.hf directory fixes (the architecture, d2v_jax/init.py resolve_config), so the checks
  and everything built after them see the weights' shapes."""
  if cfg.get("init", None) is not None and cfg.init.get("hf", ""):
    from d2v_jax import init as init_lib
    init_lib.resolve_config(cfg)
  enc = cfg.model.encoder
  checks = [
      (1 <= cfg.target.top_k <= enc.num_layers,
       f"target.top_k={cfg.target.top_k} must be in [1, model.encoder.num_layers={enc.num_layers}]"),
      (enc.hidden % enc.heads == 0,
       f"model.encoder.hidden={enc.hidden} is not divisible by heads={enc.heads}"),
      (cfg.total_steps > 0, f"total_steps={cfg.total_steps} must be > 0"),
      (cfg.checkpoint_every > 0, f"checkpoint_every={cfg.checkpoint_every} must be > 0"),
      (cfg.batch_size > 0, f"batch_size={cfg.batch_size} must be > 0"),
      (0.0 <= cfg.teacher.tau_start <= 1.0 and 0.0 <= cfg.teacher.tau_end <= 1.0,
       "teacher.tau_start and tau_end must be in [0, 1]"),
      (cfg.target.layer_output in ("ffn", "end"), "target.layer_output must be ffn or end"),
      (cfg.target.layer_norm in ("layer", "instance", "none"),
       "target.layer_norm must be layer, instance or none"),
      (cfg.target.final_norm in ("layer", "instance", "none"),
       "target.final_norm must be layer, instance or none"),
      (cfg.loss.reduce_dims in ("sum", "mean"), "loss.reduce_dims must be sum or mean"),
      (cfg.dtype in ("float32", "bfloat16"), f"dtype={cfg.dtype!r} must be float32 or bfloat16"),
  ]
  for p in ("mask_prob", "random_token_prob", "leave_unmasked_prob"):
    if p in cfg.data:
      checks.append((0.0 <= cfg.data[p] <= 1.0, f"data.{p}={cfg.data[p]} must be in [0, 1]"))
  for ok, msg in checks:
    if not ok:
      raise ConfigError(msg)


def to_dict(cfg: ml_collections.ConfigDict) -> dict:
  return json.loads(cfg.to_json_best_effort())


def write_resolved(cfg: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes config.json (machine-readable) into the run directory; returns its path."""
  path = os.path.join(workdir, "config.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(to_dict(cfg), f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  return path


def from_dict(d: dict) -> ml_collections.ConfigDict:
  """Inverse of to_dict (for export / inspection of a finished run); marked resolved."""
  return mark_resolved(ml_collections.ConfigDict(d))


def set_path(cfg: ml_collections.ConfigDict, key: str, value) -> None:
  """cfg["a"]["b"]["c"] = value for key "a.b.c"."""
  *parents, leaf = key.split(".")
  node = cfg
  for k in parents:
    node = node[k]
  node[leaf] = value


def apply_override(cfg: ml_collections.ConfigDict, item: str) -> None:
  """A "a.b.c=VALUE" string onto an existing key, converted to the type of its value
  (bool: 1/true/yes; int, float; tuple / list as a Python literal; anything else stays the
  string), for tools that take overrides as strings rather than --config.KEY flags."""
  key, eq, value = item.partition("=")
  *parents, leaf = key.split(".")
  node = cfg
  try:
    for k in parents:
      node = node[k]
  except (KeyError, AttributeError, TypeError):
    node = None
  if not eq or node is None or leaf not in node:
    raise ConfigError(f"override {item!r}: expected KEY=VALUE with an existing key")
  old = node[leaf]
  try:
    if isinstance(old, bool):
      node[leaf] = value.lower() in ("1", "true", "yes")
    elif isinstance(old, (int, float)):
      node[leaf] = type(old)(value)
    elif isinstance(old, (tuple, list)):   # "()", "(16000, 32000)", "[1, 2]"
      parsed = ast.literal_eval(value)
      parsed = parsed if isinstance(parsed, (tuple, list)) else (parsed,)
      node[leaf] = type(old)(parsed)
    else:
      node[leaf] = value
  except (ValueError, TypeError, SyntaxError) as e:
    raise ConfigError(f"override {item!r}: {value!r} is not a {type(old).__name__} like the "
                      f"current value {old!r} ({str(e).splitlines()[0]})") from None


def die(msg: str, code: int = 2) -> None:
  print(f"error: {msg}", file=sys.stderr)
  raise SystemExit(code)
