"""Every check of a config, in one place, before anything is built or read.

`validate(cfg)` only checks: it reads no file and changes nothing. It runs once per entry
point, on the config d2v_jax/resolve.py filled (late defaults, the init's architecture, the
batch scaling): resolve.resolve calls it, the trainer between its resolve steps, build() for
a config made in code.

1. range checks that hold for every modality, the scaling settings, the guards and the
   evaluation keys;
2. the modality's own checks (data.validate) and what its embedder must have (check_embedder).

A failed check raises config.ConfigError with one line: the key, its value and what is allowed.
"""

from __future__ import annotations

import math

from d2v_jax import config as config_lib, metrics, objectives, optim, scaling
from d2v_jax.config import ConfigError
from d2v_jax.modality import Modality, check_embedder, load as load_modality
from d2v_jax.probe.features import layer_index

NORMS = ("layer", "instance", "none")


def validate(cfg, mod: Modality | None = None) -> None:
  """Raises ConfigError on the first failed check; `mod`: the modality, when already loaded."""
  mod = mod or load_modality(cfg.modality)
  scaling.check(cfg)
  for ok, msg in _finite(cfg) + _values(cfg) + _common(cfg) + _v2(cfg) + _guards(cfg.guards) + _eval(cfg):
    if not ok:
      raise ConfigError(msg)
  mod.data.validate(cfg)
  try:
    embed = mod.model.build(cfg)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  for ok, msg in check_embedder(cfg, embed):
    if not ok:
      raise ConfigError(msg)


def _finite(cfg) -> list[tuple[bool, str]]:
  """Every number of the config is finite (nan / inf parse as floats and would train on)."""
  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, dict):
        yield from walk(v, f"{prefix}{k}.")
      elif isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
          if isinstance(x, float):
            yield f"{prefix}{k}[{i}]", x
      elif isinstance(v, float):
        yield f"{prefix}{k}", v
  return [(math.isfinite(v), f"{key}={v} must be a finite number")
          for key, v in walk(cfg.to_dict(), "")]


def _rate_keys(node, prefix=""):
  """Dotted keys of every probability-like value (a dropout rate, a *_prob): in [0, 1]."""
  for k, v in node.items():
    if hasattr(v, "items"):
      yield from _rate_keys(v, f"{prefix}{k}.")
    elif isinstance(v, (int, float)) and not isinstance(v, bool) and (
        k.endswith("_prob") or "dropout" in k or k in ("drop_path", "layerdrop")):
      yield f"{prefix}{k}", v


def _values(cfg) -> list[tuple[bool, str]]:
  """Ranges of the numeric settings every modality has (optimizer, schedule, model, loss)."""
  o, enc = cfg.optim, cfg.model.encoder
  checks = [(0.0 <= v <= 1.0, f"{key}={v} must be in [0, 1]") for key, v in _rate_keys(cfg)]
  checks += [
      (0.0 < o.lr <= 1.0, f"optim.lr={o.lr} must be in (0, 1]"),
      (0.0 <= o.b1 < 1.0 and 0.0 <= o.b2 < 1.0,
       f"optim.b1={o.b1} and optim.b2={o.b2} must be in [0, 1)"),
      (o.eps > 0, f"optim.eps={o.eps} must be > 0"),
      (o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0"),
      (o.clip >= 0, f"optim.clip={o.clip} must be >= 0 (0 = off)"),
      (o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0"),
      (0.0 <= o.init_lr_scale <= 1.0 and 0.0 <= o.final_lr_scale <= 1.0,
       f"optim.init_lr_scale={o.init_lr_scale} and final_lr_scale={o.final_lr_scale} must be "
       "in [0, 1]"),
      (o.schedule in ("cosine", "tri_stage", "constant"),
       f"optim.schedule={o.schedule!r} must be cosine, tri_stage or constant"),
      (len(o.stage_ratios) == 3 and min(o.stage_ratios) >= 0 and sum(o.stage_ratios) <= 1 + 1e-6,
       f"optim.stage_ratios={tuple(o.stage_ratios)} must be 3 fractions >= 0 with sum <= 1"),
      (cfg.teacher.anneal_steps >= 0,
       f"teacher.anneal_steps={cfg.teacher.anneal_steps} must be >= 0"),
      (min(enc.num_layers, enc.hidden, enc.heads, enc.mlp_dim) >= 1,
       f"model.encoder num_layers={enc.num_layers}, hidden={enc.hidden}, heads={enc.heads}, "
       f"mlp_dim={enc.mlp_dim} must all be >= 1"),
      (enc.layer_norm_eps > 0, f"model.encoder.layer_norm_eps={enc.layer_norm_eps} must be > 0"),
      (cfg.loss.beta >= 0, f"loss.beta={cfg.loss.beta} must be >= 0 (0 = squared error)"),
      (cfg.loss.scale is None or cfg.loss.scale > 0,
       f"loss.scale={cfg.loss.scale} must be > 0 (or unset: 1/sqrt(dim))"),
      (cfg.keep_checkpoints >= 1, f"keep_checkpoints={cfg.keep_checkpoints} must be >= 1"),
      (cfg.log_every >= 1, f"log_every={cfg.log_every} must be >= 1"),
      (cfg.seed >= 0, f"seed={cfg.seed} must be >= 0"),
  ]
  return checks


def _common(cfg) -> list[tuple[bool, str]]:
  enc = cfg.model.encoder
  checks = [
      (cfg.objective in objectives.OBJECTIVES,
       f"objective={cfg.objective!r} must be one of {sorted(objectives.OBJECTIVES)}"),
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
      (cfg.target.layer_norm in NORMS, "target.layer_norm must be layer, instance or none"),
      (cfg.target.final_norm in NORMS, "target.final_norm must be layer, instance or none"),
      (cfg.loss.reduce_dims in ("sum", "mean"), "loss.reduce_dims must be sum or mean"),
      (cfg.dtype in ("float32", "bfloat16"), f"dtype={cfg.dtype!r} must be float32 or bfloat16"),
  ]
  # Only the cosine schedule reads optim.warmup_steps: set on the command line with another
  # schedule it would be silently ignored (audio's tri_stage warms up for stage_ratios[0]).
  o = cfg.optim
  if "optim.warmup_steps" in config_lib.explicit_keys(cfg) and o.schedule != "cosine":
    where = (f"its warm-up is optim.stage_ratios[0] x total_steps = "
             f"{optim.tri_stage_lengths(o, cfg.total_steps)[0]} steps: set optim.stage_ratios"
             if o.schedule == "tri_stage" else "it has no warm-up")
    checks.append((False, f"optim.warmup_steps={o.warmup_steps} has no effect with "
                          f"optim.schedule={o.schedule} ({where}), or optim.schedule=cosine"))
  for p in ("mask_prob", "random_token_prob", "leave_unmasked_prob"):
    if p in cfg.data:
      checks.append((0.0 <= cfg.data[p] <= 1.0, f"data.{p}={cfg.data[p]} must be in [0, 1]"))
  return checks


def _v2(cfg) -> list[tuple[bool, str]]:
  if cfg.objective != "v2":
    return []
  v, d = cfg.v2, cfg.v2.decoder
  return [
      (v.clone_batch >= 1, f"v2.clone_batch={v.clone_batch} must be >= 1"),
      (0.0 < v.mask_prob < 1.0, f"v2.mask_prob={v.mask_prob} must be in (0, 1): some tokens "
       "masked, some visible"),
      (v.mask_length >= 1, f"v2.mask_length={v.mask_length} must be >= 1"),
      # The conv blocks are the only path from the visible tokens to the masked positions (the
      # student never encodes those): without one every prediction is a function of noise.
      (d.layers >= 1, f"v2.decoder.layers={d.layers} must be >= 1: the conv blocks carry the "
       "visible tokens to the masked positions"),
      (d.kernel >= 1 and d.dim >= 1 and d.groups >= 1 and d.dim % d.groups == 0,
       f"v2.decoder: dim={d.dim} must be a positive multiple of groups={d.groups} and "
       f"kernel={d.kernel} >= 1"),
      (d.proj_layers >= 1, f"v2.decoder.proj_layers={d.proj_layers} must be >= 1"),
      (d.proj_init in ("torch", "bert"), f"v2.decoder.proj_init={d.proj_init!r} must be torch "
       "or bert"),
  ]


def _guards(g) -> list[tuple[bool, str]]:
  checks = [(g[key] in allowed, f"guards.{key}={g[key]!r} must be one of {allowed}")
            for key, allowed in (("nonfinite_policy", metrics.NONFINITE_POLICIES),
                                 ("collapse_policy", metrics.COLLAPSE_POLICIES),
                                 ("rank_policy", metrics.COLLAPSE_POLICIES))]
  checks += [(g[key] >= 0, f"guards.{key}={g[key]} must be >= 0")
             for key in ("max_nonfinite", "max_rollbacks", "collapse_after", "min_target_rank",
                         "min_pred_rank", "rank_after")]
  checks.append((g.rank_window >= 1, f"guards.rank_window={g.rank_window} must be >= 1"))
  return checks


def _eval(cfg) -> list[tuple[bool, str]]:
  e = cfg.eval
  checks = [
      (e.step_rank_every >= 0, f"eval.step_rank_every={e.step_rank_every} must be >= 0 (0 = off)"),
      (not e.probe_every or bool(e.probe_data),
       "eval.probe_every > 0 needs eval.probe_data: a folder per class (images, audio) or a "
       "text<TAB>label TSV (text)"),
      (e.probe_weights in ("student", "teacher"),
       f"eval.probe_weights={e.probe_weights!r}: use student or teacher"),
  ]
  if e.rank_every or e.probe_every:   # a bad layer fails at start-up, not at the first evaluation
    try:
      layer_index(int(e.layer), int(cfg.model.encoder.num_layers))
    except ConfigError as err:
      checks.append((False, f"eval.{err}"))
  return checks
