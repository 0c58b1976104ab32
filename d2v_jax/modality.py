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
            process_count). Every batch has "mask": bool [B, T - num_extra_tokens], the positions
            the loss covers. Batch `s` must be a pure function of (cfg, s, process_index):
            resume = restart at start_step.
          example_batch(cfg, batch_size) -> one batch of the same structure (shapes, init).
          synthetic_batch(cfg, batch_size, seed) -> a batch with random content and real masks
            (benchmarks, AOT compile).
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
import types

from d2v_jax.config import ConfigError

BUILT_IN = ("text", "vision", "audio")


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
  has_hf = importlib.util.find_spec(hf_path) is not None if name not in BUILT_IN else True
  return Modality(name, model, data, hf_path if has_hf else "")


def hf_modules() -> dict[str, types.ModuleType]:
  """The built-in HF maps by modality (the init CLI picks a modality by model_type)."""
  return {m: importlib.import_module(_paths(m)[2]) for m in BUILT_IN}
