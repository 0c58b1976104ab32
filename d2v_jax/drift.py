"""Config drift on resume: a relaunch must train the run it resumes, not another one.

Every key changes the training trajectory (model, batch, lr and schedules, seed, data, steps)
except the OPERATIONAL ones (how often to log / save, the mesh, guards, evaluation, where
caches live, which attention kernel computes the same function). A resume whose config differs
from the one the checkpoint was trained with in a trajectory key is refused, listing the keys,
unless `--config.resume_allow_changes=KEY[,KEY...]` names them (a key, or a section such as
`optim`). A checkpoint at step 0 (python -m d2v_jax.init) has not trained yet: anything goes.

config.json is the config of the latest launch. It is rewritten only when its content changes,
and then the old and new value of every changed key are first appended to config_changes.jsonl
with the step the launch resumed from (so the file says which config trained which steps).
"""

from __future__ import annotations

import json
import os
import time

from d2v_jax import config as config_lib
from d2v_jax.config import ConfigError

CHANGES_FILE = "config_changes.jsonl"
OPERATIONAL = (
    "checkpoint_every", "keep_checkpoints", "log_every", "mesh", "guards", "eval", "init",
    "resume_strict", "resume_allow_changes",
    "data.cache_dir", "data.threads", "data.tfds_data_dir",
    # Bad-record policies only act on a record the previous launch could not get past.
    "data.on_bad_image", "data.on_bad_file",
    # How the batch-size rule derived the recipe's values (d2v_jax/scaling.py): what it
    # derived (optim.lr, teacher.*, step counts) is compared itself.
    "scaling",
    # The same function computed another way (kernel, recomputation, scan unrolling).
    "model.encoder.attention", "model.encoder.remat", "model.encoder.scan_unroll",
    "model.encoder.key_padding",
)


def flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _under(key: str, prefixes) -> bool:
  return any(key == p or key.startswith(p + ".") for p in prefixes)


def differences(old: dict, new: dict, skip_unset: bool = False) -> dict[str, tuple]:
  """key -> (old, new) for keys both configs hold with different values (JSON-normalised).
  skip_unset: keys whose new value is None are not compared (resolved later, e.g. text
  model.vocab_size from the tokenizer)."""
  a, b = flatten(json.loads(json.dumps(old))), flatten(json.loads(json.dumps(new)))
  return {k: (a[k], b[k]) for k in sorted(a.keys() & b.keys())
          if a[k] != b[k] and not (skip_unset and b[k] is None)}


def allowed_keys(cfg) -> tuple[str, ...]:
  """resume_allow_changes as keys / sections; a name that is no config key is an error."""
  raw = str(cfg.get("resume_allow_changes", "") or "")
  names = tuple(n.strip() for n in raw.split(",") if n.strip())
  keys = flatten(config_lib.to_dict(cfg))
  for n in names:
    if not any(_under(k, (n,)) for k in keys):
      raise ConfigError(f"resume_allow_changes names {n!r}, which is no config key or section")
  return names


def _short(v) -> str:
  text = json.dumps(v)
  return text if len(text) <= 40 else text[:37] + "..."


def check(cfg, saved: dict, step: int, workdir: str, skip_unset: bool = False) -> dict:
  """The differences between the checkpoint's config `saved` and `cfg`: {"allowed": {...},
  "operational": {...}} (key -> [old, new]); ConfigError listing the trajectory keys that
  differ and are not allowed."""
  diff = differences(saved, config_lib.to_dict(cfg), skip_unset)
  allowed = allowed_keys(cfg)
  operational = {k: list(v) for k, v in diff.items() if _under(k, OPERATIONAL)}
  trajectory = {k: v for k, v in diff.items() if k not in operational}
  refused = {k: v for k, v in trajectory.items() if not _under(k, allowed) and step > 0}
  if refused:
    listed = ", ".join(f"{k} {_short(a)} -> {_short(b)}" for k, (a, b) in refused.items())
    raise ConfigError(
        f"resuming {workdir} at step {step} would change how the run trains: {listed}; rerun "
        f"with the run's settings ({os.path.join(workdir, 'config.json')}) or allow exactly "
        f"these with --config.resume_allow_changes={','.join(refused)} (recorded in "
        f"{CHANGES_FILE}), or choose another --workdir")
  return {"allowed": {k: list(v) for k, v in trajectory.items()}, "operational": operational}


def describe(changes: dict) -> str | None:
  """The line a resume with allowed changes prints (None without any)."""
  allowed = changes.get("allowed") or {}
  if not allowed:
    return None
  return ("resuming with changed settings (resume_allow_changes): "
          + ", ".join(f"{k} {_short(a)} -> {_short(b)}" for k, (a, b) in allowed.items()))


def write_config(cfg, workdir: str, step: int, changes: dict | None = None) -> str | None:
  """Writes config.json when its content changes; the previous values go to CHANGES_FILE first,
  with the step this launch started from. Returns a line to print when it rewrote an existing
  config.json, else None."""
  path = os.path.join(workdir, "config.json")
  new = config_lib.to_dict(cfg)
  old = None
  if os.path.exists(path):
    try:
      with open(path) as f:
        old = json.load(f)
    except (OSError, ValueError):
      old = {}   # unreadable: replaced, and said so below
  if old == json.loads(json.dumps(new)):
    return None
  line = None
  if old is not None:
    diff = differences(old, new)
    added = sorted(set(flatten(new)) - set(flatten(old)))
    row = {"step": int(step), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
           "changed": {k: list(v) for k, v in diff.items()}, "added": added,
           "allowed": sorted((changes or {}).get("allowed", {}))}
    with open(os.path.join(workdir, CHANGES_FILE), "a") as f:
      f.write(json.dumps(row) + "\n")
    line = (f"config.json updated from step {step}: {len(diff)} changed, {len(added)} new keys; "
            f"the previous values are in {os.path.join(workdir, CHANGES_FILE)}")
  config_lib.write_resolved(cfg, workdir)
  return line
