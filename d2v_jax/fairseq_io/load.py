"""init.fairseq: a new run (or `python -m d2v_jax.init --fairseq`) that starts from a fairseq
data2vec checkpoint, where fairseq stopped: student, EMA teacher, regression head / decoder.

`resolve_config(cfg)` (run by resolve through init_weights.resolve_config, before anything is
built) takes the checkpoint's settings (arch.py). Its architecture keys (ARCH_PREFIXES: shapes,
norms, positional encoders, what the teacher averages and shares) are fixed: a command-line
value that contradicts one is a one-line error. The rest (dropouts, targets, loss, EMA
schedule, masks) are the checkpoint's unless the command line sets them.
`load(cfg, shapes)` gives host arrays in our layout: (params, teacher or None).
"""

from __future__ import annotations

import os
import sys

import jax

from d2v_jax import config as config_lib
from d2v_jax.config import ConfigError
from d2v_jax.fairseq_io import arch, ckpt, convert, layouts

ARCH_PREFIXES = ("objective", "model.", "head.", "teacher.ema_subtrees", "teacher.share_local",
                 "v2.decoder.kind", "v2.decoder.dim", "v2.decoder.kernel", "v2.decoder.groups",
                 "v2.decoder.layers", "v2.decoder.proj_layers", "v2.decoder.proj_ratio",
                 "v2.decoder.residual")
ARCH_EXEMPT = ("model.encoder.dropout", "model.encoder.attention_dropout",
               "model.encoder.activation_dropout", "model.encoder.layerdrop",
               "model.encoder.drop_path", "model.embed_dropout", "model.feature_dropout",
               "model.feature_grad_mult")

_CACHE: dict = {}


def read(path: str):
  """(model cfg, numpy state, layout) of a fairseq checkpoint; read once per process."""
  key = (os.path.abspath(path), os.path.getmtime(path) if os.path.exists(path) else None)
  if key not in _CACHE:
    model_cfg, state = ckpt.read(path)
    _CACHE.clear()   # one checkpoint at a time: they are large
    _CACHE[key] = (model_cfg, state, layouts.layout(model_cfg))
  return _CACHE[key]


def _is_arch(key: str) -> bool:
  return key not in ARCH_EXEMPT and any(key == p or (p.endswith(".") and key.startswith(p))
                                        for p in ARCH_PREFIXES)


def _same(a, b) -> bool:
  if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
    return list(a or ()) == list(b or ())
  if isinstance(a, float) or isinstance(b, float):
    return a is not None and b is not None and abs(float(a) - float(b)) <= 1e-12 * max(abs(float(b)), 1)
  return a == b


def resolve_config(cfg) -> None:
  """cfg takes init.fairseq's settings (see the module doc); a no-op without init.fairseq or
  for a config already resolved."""
  path = str(cfg.init.fairseq or "")
  if not path or config_lib.is_resolved(cfg):
    return
  if cfg.init.hf or cfg.init.checkpoint:
    raise ConfigError("init.fairseq and init.hf / init.checkpoint are both set; choose one")
  model_cfg, state, layout = read(path)
  if layout.modality != cfg.modality:
    raise ConfigError(f"init.fairseq={path!r} holds a {layout.modality} model ({layout.name}); "
                      f"use configs/{layout.modality}.py")
  explicit = config_lib.explicit_keys(cfg)
  changed, fixed = [], []
  for key, value in arch.settings(model_cfg, state, layout).items():
    ours = config_lib.get_path(cfg, key)
    if key in explicit and not _same(ours, value):
      if _is_arch(key):
        raise ConfigError(f"--config.{key}={ours!r} contradicts init.fairseq={path!r} ({layout.name}: "
                          f"{value!r}); drop the flag: the architecture comes from the checkpoint")
      continue
    if not _same(ours, value):
      config_lib.set_path(cfg, key, tuple(value) if isinstance(value, list) else value)
      changed.append(f"{key}={value}")
    fixed.append(key)
  if layout.modality == "text":   # blocks within the checkpoint's positions (RoBERTa offset)
    room = int(cfg.model.max_positions) - int(cfg.model.pad_id) - 1
    if cfg.data.block_size > room and "data.block_size" not in explicit:
      cfg.data.block_size = room
      changed.append(f"data.block_size={room}")
  config_lib.mark_explicit(cfg, fixed)   # the tokenizer / data prepare must not override them
  if jax.process_index() == 0:
    print(f"init.fairseq={path} ({layout.name}): {len(changed)} settings from the checkpoint"
          + (f" ({', '.join(changed[:6])}{', ...' if len(changed) > 6 else ''})" if changed else ""),
          flush=True)


def load(cfg, shapes: dict) -> tuple[dict, dict | None]:
  """(student params, teacher or None) of init.fairseq as host arrays in our layout."""
  model_cfg, state, layout = read(str(cfg.init.fairseq))
  scan = bool(cfg.model.encoder.scan)
  params = convert.from_state(layout, state, shapes, scan)
  teacher = convert.teacher_from_state(layout, state, shapes, scan, cfg.teacher.ema_subtrees)
  if teacher is None and jax.process_index() == 0:
    print(f"warning: init.fairseq={cfg.init.fairseq} holds no EMA teacher ({layout.ema_key}); "
          "the teacher starts as a copy of the student", file=sys.stderr, flush=True)
  return params, teacher
