"""The one phase that changes a config: everything derived, then checked once, then frozen.

`resolve(cfg, workdir=None)` (every entry point calls it once, on the config it parsed):

1. settings(cfg): the keys that configs of older runs lack (config.LATE_DEFAULTS and the
   modality's data LATE_DEFAULTS), so code reads every key directly; the architecture of
   init.hf / init.fairseq (init_weights.resolve_config), so the checks and everything built
   after them see the weights' shapes; then the recipe scaled to the global batch
   (scaling.apply: after the init's settings, which may carry the recipe's schedule);
2. validate.validate(cfg): the checks, no change;
3. data(cfg, mod, workdir): the keys the data fixes (text: model.vocab_size / pad_id from the
   tokenizer); with a workdir the modality's prepare() (which may train a tokenizer), without
   one resolve_offline(), which reads no data set (AOT compile, `python -m d2v_jax.init`);
   then the config is locked and marked (`frozen`): build() takes it as it is.

The trainer runs the three steps apart: its run-directory, resume and mesh checks come
between 2 and 3, before a corpus is read. A config made in code (tests, benchmarks) and
handed to build() unfrozen gets steps 1 and 2 there.
"""

from __future__ import annotations

from d2v_jax import config as config_lib, init_weights, scaling, validate
from d2v_jax.modality import Modality, load as load_modality


def settings(cfg, mod: Modality | None = None) -> Modality:
  """Step 1 (module doc); returns the modality, loaded once for the caller to hand on."""
  mod = mod or load_modality(cfg.modality)
  config_lib.fill_defaults(cfg, getattr(mod.data, "LATE_DEFAULTS", {}))
  init_weights.resolve_config(cfg)
  scaling.apply(cfg)
  # Once per config object: a second call (build() of a config made in code, again) derives
  # nothing twice. A mark on the object, not a config key: config.json stays as it is.
  config_lib.mark_resolved(cfg)
  return mod


def data(cfg, mod: Modality, workdir: str | None = None):
  """Step 3 (module doc): the data's keys, then the config frozen; returns it."""
  if workdir is None:
    mod.data.resolve_offline(cfg, "")
  else:
    mod.data.prepare(cfg, workdir)
  cfg.lock()   # no new keys from here on
  object.__setattr__(cfg, "_d2v_frozen", True)   # checked: build() skips steps 1-2
  return cfg


def resolve(cfg, workdir: str | None = None, *, mod: Modality | None = None) -> Modality:
  """Steps 1-3 (module doc); returns the modality."""
  if frozen(cfg):
    return mod or load_modality(cfg.modality)
  mod = settings(cfg, mod)
  validate.validate(cfg, mod)
  data(cfg, mod, workdir)
  return mod


def frozen(cfg) -> bool:
  return bool(getattr(cfg, "_d2v_frozen", False))
