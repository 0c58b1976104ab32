"""How the modality-neutral core finds a modality's pieces (no registry to edit).

`config.modality` names a modality in one of two ways:

  "text", "vision", "audio"   built in: d2v_jax/models/<m>.py, d2v_jax/data/<m>.py, d2v_jax/hf/<m>.py
  "pkg.sub"                   your own, importable package: pkg/sub/model.py, pkg/sub/data.py and,
                              optionally, pkg/sub/hf.py (a worked example: tests/test_fourth_modality.py)

plus a config file (`configs/<m>.py` or anywhere: get_config(arg) -> ConfigDict built on
d2v_jax/recipe.base_config, with `modality` set to the name above). The contract:

  model   build(cfg) -> flax embedder module with
            __call__(batch, *, student: bool, deterministic: bool)
              -> (x [B, T, D], valid [B, T] bool or None, attn_bias [B|1, H|1, T, T] or None)
            attribute num_extra_tokens: leading positions (CLS) that are never targets;
            student=True embeds the masked view, student=False the unmasked input.
          optional: init_fixup(params, rng, cfg) -> params (a modality's own initialisation);
            ATTENTION_BIAS (what its attention bias is, for the start-up line).
  data    prepare(cfg, workdir): resolves data-dependent config values in place (e.g.
            model.vocab_size from the tokenizer); runs on every process.
          resolve_offline(cfg, workdir): the same model keys without reading the data set
            (AOT compile, `python -m d2v_jax.init`).
          validate(cfg): raises d2v_jax.config.ConfigError on values out of range.
          build_dataset(cfg, workdir, *, start_step, process_index, process_count) -> iterable
            of per-process batches (dicts of numpy arrays, leading dim cfg.batch_size //
            process_count). Every batch has "mask": bool [B, T - num_extra_tokens] (1.0) or
            [B, M, T - num_extra_tokens] with "visible" int [B, M, K] (2.0), the positions the
            loss covers (Batch below). Batch `s` must be a pure function of (cfg, s, process_index):
            resume = restart at start_step.
          example_batch(cfg, batch_size) -> one batch of the same structure (the shapes of
            init and of the AOT compile, build.abstract_batch).
          synthetic_batch(cfg, batch_size, seed) -> a batch with random content and real masks
            (benchmarks, parity tests).
          labelled_set(cfg, workdir, path) -> d2v_jax.data.labelled.LabelledSet: a labelled
            probe set, preprocessed as in training without masking (python -m d2v_jax.probe).
          optional: tf_dataset(...) (the tf.data.Dataset behind build_dataset, for the input
            benchmark); LATE_DEFAULTS (values of data keys added after runs were written).
  hf      (optional) the tables of its Hugging Face map: FAMILY, FAMILIES (config.json
            model_type values it imports), ARCH (config.json field -> our key), PREFIXES, PROBE, HINT,
            ARCHITECTURE, FLAX, table(cfg), check_representable(cfg), hf_config(cfg),
            write_extra(cfg, out_dir, workdir); optional complete / complete_flax /
            resolve_config for its special cases, and remote_map(cfg) -> the module name of
            another map (with REMOTE: a modeling file the export copies, loaded with
            trust_remote_code) for models its usual class cannot hold. d2v_jax/hf/common.py does the walk, the
            shape checks, the export and the import for every modality.

The FLOP model needs nothing per modality: d2v_jax/flops.py counts the embedder's matmuls on
its traced forward.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import types
from typing import Protocol, TypedDict

import numpy as np

from d2v_jax.config import ConfigError

BUILT_IN = ("text", "vision", "audio")


class Batch(TypedDict, total=False):
  """The keys a modality's batches carry (numpy on the host, jax.Array on device); the leading
  dimension is the batch. `mask` is every modality's; the rest are the modality's own."""
  mask: np.ndarray       # bool [B, T] (1.0) or [B, M, T] (2.0: M clones): loss positions
  visible: np.ndarray    # int32 [B, M, K] (2.0): the ascending unmasked positions, K static
  source: np.ndarray     # text: int32 [B, T] token ids (the teacher's view)
  student: np.ndarray    # text 1.0: int32 [B, T] the masked ids the student reads
  image: np.ndarray      # vision: float32 [B, H, W, C] normalised
  audio: np.ndarray      # audio: float32 [B, S] normalised samples
  audio_len: np.ndarray  # audio: int32 [B] real samples per row


class Embedder(Protocol):
  """What models/<m>.py build(cfg) returns: a flax module. 1.0 needs __call__; a teacher that
  reads the student's local features (teacher.share_local) needs local + context (context
  taking `mask` for 1.0: it inserts the mask itself); 2.0 needs local + visible, and its 2-D
  decoder a `grid`. validate() checks what the config needs (check_embedder)."""
  num_extra_tokens: int

  def __call__(self, batch: Batch, *, student: bool, deterministic: bool): ...

  def local(self, batch: Batch, *, student: bool = False, deterministic: bool = True): ...

  def context(self, x, valid, *, deterministic: bool = True, mask=None): ...

  def visible(self, x, valid, mask, visible, *, deterministic: bool): ...


# The functions a modality's model / data modules must define (the contract above).
REQUIRED = {"model": ("build",),
            "data": ("prepare", "resolve_offline", "validate", "build_dataset", "example_batch",
                     "synthetic_batch", "labelled_set")}


def check_embedder(cfg, embed) -> list[tuple[bool, str]]:
  """(ok, message) checks that the embedder has what cfg's objective and teacher use."""
  cls = type(embed)
  needs = ["__call__"]
  if cfg.objective == "v2":
    needs += ["local", "visible"]
  if cfg.teacher.share_local:
    needs += ["local", "context"]
  out = [(hasattr(cls, n), f"modality {cfg.modality!r}: its embedder {cls.__name__} has no "
          f"{n}() (needed by objective={cfg.objective!r}, teacher.share_local="
          f"{bool(cfg.teacher.share_local)}; d2v_jax/modality.py Embedder)") for n in dict.fromkeys(needs)]
  if cfg.objective == "v1" and cfg.teacher.share_local and hasattr(cls, "context"):
    takes_mask = "mask" in inspect.signature(cls.context).parameters
    out.append((takes_mask, f"teacher.share_local=True with objective v1: {cls.__name__}.context() "
                "takes no mask (this modality masks its input, not its local features); set "
                "teacher.share_local=False"))
  if cfg.objective == "v2" and cfg.v2.decoder.kind == "2d":
    out.append((bool(getattr(embed, "grid", 0)), f"v2.decoder.kind=2d needs a patch grid: "
                f"{cls.__name__} has no `grid`; use v2.decoder.kind=1d"))
  return out


@dataclasses.dataclass(frozen=True)
class Modality:
  name: str
  model: types.ModuleType
  data: types.ModuleType
  _hf: str          # module path of the HF map ("" = none)

  def hf(self) -> types.ModuleType:
    """The HF map (imported on first use); ConfigError when the modality has none."""
    if not self._hf:
      raise ConfigError(f"modality {self.name!r} has no Hugging Face map (no hf module): it "
                        "cannot export to or import from Hugging Face")
    return importlib.import_module(self._hf)

  @property
  def has_hf(self) -> bool:
    return bool(self._hf)


def _paths(name: str) -> tuple[str, str, str]:
  if name in BUILT_IN:
    return f"d2v_jax.models.{name}", f"d2v_jax.data.{name}", f"d2v_jax.hf.{name}"
  return f"{name}.model", f"{name}.data", f"{name}.hf"


def load(name: str) -> Modality:
  """The model / data modules of modality `name` (and where its HF map is)."""
  model_path, data_path, hf_path = _paths(name)
  try:
    model = importlib.import_module(model_path)
    data = importlib.import_module(data_path)
  except ModuleNotFoundError as e:
    raise ConfigError(f"unknown modality {name!r} ({e}); built in: {', '.join(BUILT_IN)}, or an "
                      "importable package with model.py and data.py (d2v_jax/modality.py)") from None
  for part, module in (("model", model), ("data", data)):
    missing = [f for f in REQUIRED[part] if not callable(getattr(module, f, None))]
    if missing:
      raise ConfigError(f"modality {name!r}: {module.__name__} lacks {missing}, which the contract "
                        "needs (d2v_jax/modality.py)")
  has_hf = importlib.util.find_spec(hf_path) is not None if name not in BUILT_IN else True
  return Modality(name, model, data, hf_path if has_hf else "")


def hf_modules() -> dict[str, types.ModuleType]:
  """The built-in HF maps by modality (the init CLI picks a modality by model_type)."""
  return {m: importlib.import_module(_paths(m)[2]) for m in BUILT_IN}
