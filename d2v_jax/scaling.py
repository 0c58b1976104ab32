"""Batch-size scaling: a recipe written for a reference global batch B0, run at batch B.

With k = B / B0 (docs/training.md, "Another batch size"):

  learning rate   x sqrt(k) (scaling.lr="sqrt", the usual rule for Adam; "linear": x k;
                  "none")
  EMA decay       tau -> tau ** k, for tau_start and tau_end (scaling.ema): one update at B
                  then forgets what k updates at B0 did ("How to Scale Your EMA", Busbridge et
                  al., NeurIPS 2023), so the teacher's memory in examples is unchanged
  lengths         warm-up, total steps, the EMA anneal and the checkpoint interval x 1 / k
                  (scaling.lengths): the same number of examples

Every recipe (configs/<m>.py) sets scaling.reference_batch to its own batch; 0 turns scaling
off. The rule applies when the global batch comes from the command line (--config.batch_size)
or a config file asks for it (scaling.apply=True, as the per-topology `fit=` choices do); a
batch changed in code (tests, benchmarks, the batch search) is taken as it is. Keys given on
the command line are taken as they are (the user chose them). `apply(cfg)` runs in resolve,
once: it writes the recipe's values to scaling.recipe (so config.json, and
with it resume and export, records both), the scaled ones to their usual keys, and prints one
line. `scaled(cfg, batch)` is the same rule as a pure function (the compile reports).
"""

from __future__ import annotations

import math

import jax

from d2v_jax import config as config_lib
from d2v_jax.config import ConfigError

LR_RULES = ("sqrt", "linear", "none")
# The keys the rule changes: (dotted key, kind). Lengths round to the nearest step (>= 1).
KEYS = (("optim.lr", "lr"), ("teacher.tau_start", "tau"), ("teacher.tau_end", "tau"),
        ("teacher.anneal_steps", "length"), ("optim.warmup_steps", "length"),
        ("total_steps", "length"), ("checkpoint_every", "length"))


def factor(cfg, batch: int | None = None) -> float:
  """k = B / B0 (1.0 when scaling is off)."""
  ref = int(cfg.scaling.reference_batch)
  return 1.0 if ref <= 0 else float(batch if batch is not None else cfg.batch_size) / ref


def rule(kind: str, value, k: float, s) -> float | int:
  """One value of the recipe at k = B / B0 under the scaling settings `s`."""
  if kind == "lr":
    return value * {"sqrt": math.sqrt(k), "linear": k, "none": 1.0}[s.lr]
  if kind == "tau":
    return value if not s.ema or value >= 1.0 else value ** k
  if not s.lengths or value <= 0:   # anneal_steps 0: a constant tau
    return value
  return max(1, int(round(value / k)))


def scaled(cfg, batch: int, explicit=frozenset()) -> dict:
  """{key: value at `batch`} for every KEYS entry, from the recipe's values (scaling.recipe
  when apply already ran, else the config's own); keys in `explicit` keep their value."""
  k = factor(cfg, batch)
  recipe = cfg.scaling.recipe
  out = {}
  for key, kind in KEYS:
    leaf = key.split(".")[-1]
    base = recipe[leaf] if recipe.get(leaf) is not None else config_lib.get_path(cfg, key)
    out[key] = config_lib.get_path(cfg, key) if key in explicit else rule(kind, base, k, cfg.scaling)
  return out


def check(cfg) -> None:
  s = cfg.scaling
  if s.lr not in LR_RULES:
    raise ConfigError(f"scaling.lr={s.lr!r} must be one of {LR_RULES}")
  if s.reference_batch < 0:
    raise ConfigError(f"scaling.reference_batch={s.reference_batch} must be >= 0 (0: no scaling)")


def apply(cfg) -> None:
  """Scales cfg in place to its batch_size (see the module doc); once per config."""
  check(cfg)
  s = cfg.scaling
  if s.reference_batch <= 0 or config_lib.is_resolved(cfg) or s.recipe.get("lr") is not None:
    return
  explicit = config_lib.explicit_keys(cfg)
  if ("batch_size" not in explicit and not s.apply) or cfg.batch_size == s.reference_batch:
    return
  values = scaled(cfg, int(cfg.batch_size), explicit)
  with cfg.unlocked():
    for key, _ in KEYS:
      cfg.scaling.recipe[key.split(".")[-1]] = config_lib.get_path(cfg, key)
    for key, value in values.items():
      config_lib.set_path(cfg, key, type(config_lib.get_path(cfg, key))(value))
  if jax.process_index() == 0:
    print(line(cfg, explicit), flush=True)


def line(cfg, explicit=frozenset()) -> str:
  """The start-up line: the batch against the recipe's and what changed."""
  r, k = cfg.scaling.recipe, factor(cfg)
  parts = []
  for key, kind in KEYS:
    old, new = r[key.split(".")[-1]], config_lib.get_path(cfg, key)
    if key in explicit:
      parts.append(f"{key} {new} (given)")
    elif old != new:
      fmt = (lambda v: f"{v:.3g}") if kind == "lr" else (lambda v: f"{v:.6g}") if kind == "tau" else str
      parts.append(f"{key} {fmt(old)} -> {fmt(new)}")
  rules = f"lr {cfg.scaling.lr}, EMA {'tau^k' if cfg.scaling.ema else 'off'}, lengths " \
          f"{'1/k' if cfg.scaling.lengths else 'off'}"
  return (f"batch {cfg.batch_size} = {k:.4g} x the recipe's {cfg.scaling.reference_batch} "
          f"({rules}): " + (", ".join(parts) if parts else "nothing to change"))


def at_batch(cfg, batch: int) -> str:
  """What the rule makes of cfg's recipe at global `batch` (the compile reports' line)."""
  if int(cfg.scaling.reference_batch) <= 0:
    return f"global batch {batch} (scaling off: scaling.reference_batch=0)"
  values = scaled(cfg, batch)
  shown = ", ".join(f"{key} {values[key]:.4g}" for key, kind in KEYS if kind in ("lr", "tau")) + \
      ", " + ", ".join(f"{key} {values[key]}" for key, kind in KEYS if kind == "length")
  return (f"global batch {batch} = {factor(cfg, batch):.4g} x the recipe's "
          f"{cfg.scaling.reference_batch}: --config.batch_size={batch} scales the recipe to {shown}")
