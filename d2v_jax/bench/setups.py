"""The benchmark problems: a config, a built step, an initial state and one realistic batch
per (modality, size). Shared by the step / mfu / compile / profile benchmarks and the tests.

Sizes (batch 16 everywhere; masks from each modality's own masking code):
  text   tiny  2 x 64   (heads 2, mlp 256),  vocab 4096, 128 tokens, span masking p=0.35
         small 4 x 256  (heads 4, mlp 1024), vocab 4096, 128 tokens (the issue's PyTorch case)
  vision tiny  4 x 64,  64 px, 8 px patches (65 tokens), BEiT block masking
         small 6 x 256, 64 px, 8 px patches
  audio  tiny  2 x 64, conv 64 ch, 2 s at 16 kHz (99 frames), span masking p=0.65 len 10
         small 4 x 256 (heads 4, mlp 1024), conv 128 ch, 2 s
The runlocal recipe of each config (dropout, drop path, EMA, optimizer, loss) is kept.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import os
from typing import Any

import jax

from d2v_jax import build as build_lib
from d2v_jax import config as config_lib
from d2v_jax.modality import load

MODALITIES = ("text", "vision", "audio")
SIZES = ("tiny", "small")
BATCH = 16

# (config spec, overrides) per modality and size
SPECS = {
    ("text", "tiny"): ("configs/text.py:variant=tiny,runlocal", {}),
    ("text", "small"): ("configs/text.py:variant=small,runlocal", {}),
    ("vision", "tiny"): ("configs/vision.py:variant=tiny,runlocal", {}),
    ("vision", "small"): ("configs/vision.py:variant=small,runlocal", {}),
    ("audio", "tiny"): ("configs/audio.py:variant=tiny,runlocal", {}),
    ("audio", "small"): ("configs/audio.py:variant=tiny,runlocal", {
        "model.encoder.num_layers": 4, "model.encoder.hidden": 256, "model.encoder.heads": 4,
        "model.encoder.mlp_dim": 1024, "model.conv_dims": (128,) * 7, "target.top_k": 4}),
}
TEXT_VOCAB = 4096
TEXT_LEN = 128
# --quick (CI smoke): text tiny cut to one layer and 32 tokens, batch 4, so every quick
# benchmark in a process shares one small compile.
QUICK = {"model.encoder.num_layers": 1, "target.top_k": 1, "data.block_size": 32}
QUICK_BATCH = 4


def repo_root() -> str:
  return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def config(modality: str, size: str, *, dtype: str = "float32", batch_size: int = BATCH,
           overrides: dict | None = None):
  """The resolved config of a benchmark problem (no data files needed)."""
  if (modality, size) not in SPECS:
    raise ValueError(f"no benchmark problem for modality={modality!r} size={size!r}; "
                     f"known: {sorted(SPECS)}")
  spec, over = SPECS[(modality, size)]
  cwd = os.getcwd()
  os.chdir(repo_root())   # config paths are relative to the repo root
  try:
    cfg = config_lib.load_file(spec)
  finally:
    os.chdir(cwd)
  if modality == "text":
    cfg.model.vocab_size = TEXT_VOCAB
    cfg.data.vocab_size = TEXT_VOCAB
    cfg.data.block_size = TEXT_LEN
  for k, v in {**over, **(overrides or {})}.items():
    config_lib.set_path(cfg, k, v)
  cfg.batch_size = batch_size
  cfg.dtype = dtype
  return cfg


def batch(cfg, seed: int = 0) -> dict:
  """One host batch of the problem: the modality's synthetic_batch (random content, real
  masks; d2v_jax/modality.py)."""
  return load(cfg.modality).data.synthetic_batch(cfg, cfg.batch_size, seed)


@dataclasses.dataclass
class Setup:
  modality: str
  size: str
  cfg: Any
  built: Any
  state: Any            # a fresh initial state (the step donates it)
  batch: dict           # host numpy
  global_batch: dict    # jax arrays with the step's batch sharding


_BUILT: dict = {}   # one build (and so one compiled step) per problem and process


def _key(modality, size, dtype, batch_size, overrides, devices) -> tuple:
  return (modality, size, dtype, batch_size, repr(sorted((overrides or {}).items())),
          tuple(str(d) for d in devices))


def make(modality: str, size: str, *, dtype: str = "float32", batch_size: int = BATCH,
         overrides: dict | None = None, devices=None, seed: int = 0) -> Setup:
  """The problem with a fresh initial state; the build (config, jitted step, batch) is
  shared by later calls with the same arguments, so benchmarks in one process compile a
  step once."""
  devices = list(devices if devices is not None else jax.devices()[:1])
  key = _key(modality, size, dtype, batch_size, overrides, devices)
  if key not in _BUILT:
    cfg = config(modality, size, dtype=dtype, batch_size=batch_size, overrides=overrides)
    built = build_lib.build(cfg, devices=devices)
    host = batch(cfg, seed)
    _BUILT[key] = (cfg, built, host, build_lib.to_global(host, built.batch_shardings))
  cfg, built, host, global_batch = _BUILT[key]
  return Setup(modality, size, cfg, built, built.init(cfg.seed), host, global_batch)


def available(modality: str) -> str | None:
  """None when the modality's model, data and HF modules import and its tiny model builds;
  else the reason (one line)."""
  try:
    build_lib.build(config(modality, "tiny", batch_size=2), devices=jax.devices()[:1])
    importlib.import_module(f"d2v_jax.hf.{modality}")
  except Exception as e:  # noqa: BLE001 - report any failure as "not available"
    first = str(e).splitlines()[0][:160] if str(e) else ""
    return f"{type(e).__name__}: {first}"
  return None


def add_set_arg(p) -> None:
  p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                 help="config override, e.g. model.encoder.scan_unroll=1 (repeatable)")


def parse_sets(items: list[str] | None) -> dict:
  """["model.encoder.scan=false", "model.encoder.hidden=128"] -> overrides (Python literals,
  true/false, else the string)."""
  out = {}
  for item in items or []:
    key, eq, value = item.partition("=")
    if not eq:
      raise ValueError(f"--set {item!r}: expected KEY=VALUE")
    if value.lower() in ("true", "false"):
      out[key] = value.lower() == "true"
      continue
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def modalities(arg: str) -> list[str]:
  """--modality text,vision | all -> names (an unknown one exits with the list)."""
  if arg == "all":
    return list(MODALITIES)
  names = [m.strip() for m in arg.split(",") if m.strip()]
  bad = [m for m in names if m not in MODALITIES]
  if bad:
    raise SystemExit(f"--modality {arg!r}: unknown {bad}; use text, vision, audio or all")
  return names


def dtypes(arg: str) -> list[str]:
  if arg == "both":
    return ["float32", "bfloat16"]
  if arg not in ("float32", "bfloat16"):
    raise SystemExit(f"--dtype {arg!r}: use float32, bfloat16 or both")
  return [arg]


def for_each_problem(args, measure, skip_column: str) -> tuple[list[dict], dict]:
  """Runs measure(modality, size, dtype, reps, batch, overrides) -> row over the problems
  the common flags select (--modality, --sizes, --dtype, --reps, --set KEY=VALUE config
  overrides, --quick: text tiny cut to QUICK, batch QUICK_BATCH, 2 rounds). A modality whose
  modules do not build gets one row
  with the reason in `skip_column`. Returns (rows, {modality: reason})."""
  quick = getattr(args, "quick", False)
  mods = ["text"] if quick else modalities(args.modality)
  sizes = ["tiny"] if quick else [x.strip() for x in args.sizes.split(",") if x.strip()]
  reps = getattr(args, "reps", 0) or (2 if quick else 10)
  batch = getattr(args, "batch_size", 0) or (QUICK_BATCH if quick else BATCH)
  over = {**(QUICK if quick else {}), **parse_sets(getattr(args, "set", None))} or None
  rows, skipped = [], {}
  for m in mods:
    reason = available(m)
    if reason:
      skipped[m] = reason
      rows.append({"modality": m, "size": "-", "dtype": "-", skip_column: f"skipped: {reason}"})
      continue
    for size in sizes:
      for dt in dtypes(getattr(args, "dtype", "float32")):
        rows.append(measure(m, size, dt, reps, batch, over))
  return rows, skipped
