"""How the modality-neutral core finds a modality's pieces (no registry to edit).

A modality `m` (config.modality == "m") is four files, found by name:

  configs/m.py        get_config(arg) -> ConfigDict (keys of configs/common.base_config + model/data)
  d2v_jax/models/m.py build(cfg) -> flax embedder module with
                        __call__(batch, *, student: bool, deterministic: bool)
                          -> (x [B, T, D], valid [B, T] bool or None, attn_bias [B|1, H|1, T, T] or None)
                        attribute num_extra_tokens: leading positions (CLS) that are never targets.
                        student=True embeds the masked view, student=False the unmasked input.
  d2v_jax/data/m.py   prepare(cfg, workdir) -> None: resolves data-dependent config values in place
                        (e.g. model.vocab_size from the tokenizer); runs on every process.
                      validate(cfg) -> None: raises d2v_jax.config.ConfigError on values out of range.
                      build_dataset(cfg, workdir, *, start_step, process_index, process_count)
                        -> iterable of per-process batches (dicts of numpy arrays, leading dim
                        cfg.batch_size // process_count). Every batch has "mask": bool
                        [B, T - num_extra_tokens], the positions the loss covers. Batch `s` must
                        be a pure function of (cfg, s, process_index): resume = restart at start_step.
                      tf_dataset(...) (optional, same arguments): the tf.data.Dataset behind
                        build_dataset, so benchmarks can set its threading options.
                      example_batch(cfg, batch_size) -> one batch of the same structure (shapes/init).
  d2v_jax/hf/m.py     export(params, cfg, out_dir, workdir) -> None: writes an HF directory.
                      load(path, cfg) -> params tree for our model (continued pretraining).
"""

from __future__ import annotations

import importlib
import types


def load(name: str) -> types.SimpleNamespace:
  """Imports the model / data / hf modules of modality `name`."""
  try:
    model = importlib.import_module(f"d2v_jax.models.{name}")
    data = importlib.import_module(f"d2v_jax.data.{name}")
  except ModuleNotFoundError as e:
    raise ValueError(f"unknown modality {name!r}: {e}") from None
  return types.SimpleNamespace(name=name, model=model, data=data,
                               hf=lambda: importlib.import_module(f"d2v_jax.hf.{name}"))
