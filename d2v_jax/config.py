"""Config files and `--config.KEY=VALUE` overrides, with one-line errors.

Parsing and type conversion are ml_collections' `config_flags`; this module only turns its
tracebacks (unknown key, wrong type) into a message that names the key, checks values that
are in range for the chosen model, and writes the resolved config next to the run.
parse_argv also records which keys the command line set (explicit_keys): values resolved
later from a tokenizer (text model.pad_id / vocab_size) or an init.hf directory (the
architecture, d2v_jax/init_weights.py) never overwrite them; a contradiction is a one-line
error. Range checks: d2v_jax/validate.py; defaults of keys older runs lack: LATE_DEFAULTS, filled
by d2v_jax/resolve.py (the one phase that changes a config).
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
    raise ConfigError(f"config file {path!r} does not exist; e.g. --config "
                      "configs/text.py:variant=tiny,runlocal")
  if not os.path.isfile(path) or not path.endswith(".py"):
    raise ConfigError(f"config file {path!r} is not a Python file (configs/<modality>.py)")
  module_spec = importlib.util.spec_from_file_location("_d2v_config", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:   # a file that is not a config: its own error, one line
    raise ConfigError(f"config file {path!r} does not load ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''})") from None
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"config file {path!r} has no get_config(arg) function")
  try:
    return module.get_config(arg or None)
  except KeyError as e:   # a variant the file's size table lacks
    valid = sorted(getattr(module, "SIZES", {}))
    raise ConfigError(f"config {spec!r}: unknown variant {e.args[0]!r}"
                      + (f"; valid: {valid}" if valid else "")) from None
  except ValueError as e:
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
  """Parses `[prog, "--config", SPEC, "--config.KEY=VALUE", ...]` with ml_collections'
  config_flags (the config loader: the command lines themselves are argparse, d2v_jax/cli.py)
  into `fv` (default: fresh absl flags), turning config errors into ConfigError."""
  fv = flags.FlagValues() if fv is None else fv   # (an empty FlagValues is falsy: no `or` here)
  if "config" not in fv:
    config_flags.DEFINE_config_file("config", None, "config file[:args]", flag_values=fv,
                                   sys_argv=argv)  # overrides come from argv, not sys.argv
  spec = _spec(argv)
  if spec is not None:
    load_file(spec)   # its one-line errors (missing, not Python, bad variant) before absl's
  try:
    fv(argv)
  except flags.Error as e:
    raise ConfigError(str(e).splitlines()[0]) from None
  except OSError as e:   # config_flags' wrapper of a failed load: the first line says it
    raise ConfigError(f"--config: {str(e).splitlines()[0]}") from None
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


def _spec(argv: list[str]) -> str | None:
  """The --config value of argv (--config=SPEC or --config SPEC), or None."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


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
  """Marks a config whose values are derived: read back from a run (config.json, checkpoint
  meta: resolved when the run started), or through resolve.settings. Nothing is resolved again
  (e.g. from an init.hf directory that may be gone by now, or a batch scaled twice)."""
  object.__setattr__(cfg, "_d2v_resolved", True)
  return cfg


def is_resolved(cfg) -> bool:
  return bool(getattr(cfg, "_d2v_resolved", False))


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


# Keys added after runs were written, with the value that reproduces how such a run trained:
# a config read back from an older run (config.json, checkpoint meta) gets them here, so code
# reads every key directly. A modality's own keys: LATE_DEFAULTS of its data module. New runs
# take their values from the config files (d2v_jax/recipe.py and the modality's file).
LATE_DEFAULTS = {
    "objective": "v1",
    "resume_strict": False,
    "resume_allow_changes": "",
    "teacher.share_local": False,
    "optim.no_decay": (),
    "optim.decay": (),
    "guards.collapse_policy": "stop",
    "guards.nonfinite_policy": "stop",
    "guards.max_nonfinite": 10,
    "guards.max_rollbacks": 3,
    "guards.min_target_rank": 0.0,
    "guards.min_pred_rank": 0.0,
    "guards.rank_window": 1,
    "guards.rank_after": 0,
    "guards.rank_policy": "warn",
    "eval.rank_every": 0,
    "eval.probe_every": 0,
    "eval.probe_data": "",
    "eval.probe_weights": "student",
    "eval.layer": -1,
    "eval.rank_examples": 64,
    "eval.probe_chunk": 64,
    "eval.probe_seed": 0,
    "eval.probe_test_frac": 0.3,
    "eval.step_rank_every": 10,
    "init.hf": "",
    "init.checkpoint": "",
    "init.fairseq": "",
    "v2.decoder.proj_init": "torch",
    "scaling.reference_batch": 0,
    "scaling.lr": "sqrt",
    "scaling.ema": True,
    "scaling.lengths": True,
    "scaling.apply": False,
    "scaling.recipe": {"lr": None, "tau_start": None, "tau_end": None, "anneal_steps": None,
                       "warmup_steps": None, "total_steps": None, "checkpoint_every": None},
}


def fill_defaults(cfg: ml_collections.ConfigDict, *tables: dict) -> None:
  """Adds the keys of LATE_DEFAULTS (and of `tables`) that `cfg` lacks; present keys stay."""
  with cfg.unlocked():   # config_flags locks the config; these keys may be new
    for table in (LATE_DEFAULTS, *tables):
      for key, value in table.items():
        *parents, leaf = key.split(".")
        node = cfg
        for k in parents:
          if k not in node:
            node[k] = ml_collections.ConfigDict()
          node = node[k]
        if leaf not in node:
          node[leaf] = value


def from_dict(d: dict) -> ml_collections.ConfigDict:
  """Inverse of to_dict (for export / inspection of a finished run); marked resolved."""
  return mark_resolved(ml_collections.ConfigDict(d))


def get_path(cfg: ml_collections.ConfigDict, key: str):
  """cfg["a"]["b"]["c"] for key "a.b.c"."""
  node = cfg
  for k in key.split("."):
    node = node[k]
  return node


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
