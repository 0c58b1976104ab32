"""Helpers shared by the HF parameter maps (d2v_jax/hf/<modality>.py).

Our encoder stores its blocks either stacked (nn.scan: params['encoder']['layers']['block'],
leading axis = layer) or one subtree per layer (params['encoder']['layers_i']['block']).
The maps work on one canonical form: a list with one block tree per layer.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax
import jax
import numpy as np
from safetensors.numpy import load_file, save_file


# config.json field -> our key, for every modality's encoder (hf/<m>.py ARCH extends it): the
# architecture an init.hf directory fixes (d2v_jax/init_weights.py resolve_config).
ENCODER_ARCH = (("num_hidden_layers", "model.encoder.num_layers"),
                ("hidden_size", "model.encoder.hidden"),
                ("num_attention_heads", "model.encoder.heads"),
                ("intermediate_size", "model.encoder.mlp_dim"),
                ("layer_norm_eps", "model.encoder.layer_norm_eps"))


def unbox(tree):
  """Drops flax LogicallyPartitioned boxes and moves arrays to host numpy."""
  tree = flax.linen.meta.unbox(tree)
  return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


def layer_list(encoder: dict) -> list[dict]:
  """Encoder params -> [block params of layer 0, layer 1, ...] (either storage form)."""
  if "layers" in encoder:
    stacked = encoder["layers"]["block"]
    n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    return [jax.tree_util.tree_map(lambda x, i=i: x[i], stacked) for i in range(n)]
  n = sum(1 for k in encoder if k.startswith("layers_"))
  return [encoder[f"layers_{i}"]["block"] for i in range(n)]


def set_layers(encoder: dict, layers: list[dict], scan: bool) -> dict:
  """Inverse of layer_list: returns encoder params with the block trees stored as `scan` asks."""
  out = {k: v for k, v in encoder.items() if k != "layers" and not k.startswith("layers_")}
  if scan:
    out["layers"] = {"block": jax.tree_util.tree_map(lambda *xs: np.stack(xs), *layers)}
  else:
    for i, layer in enumerate(layers):
      out[f"layers_{i}"] = {"block": layer}
  return out


def save_state_dict(state: dict[str, np.ndarray], out_dir: str) -> str:
  """Writes PyTorch-named float32 weights as model.safetensors (no torch needed)."""
  path = os.path.join(out_dir, "model.safetensors")
  save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}, path,
            metadata={"format": "pt"})
  return path


def load_state_dict(hf_dir: str) -> dict[str, np.ndarray]:
  path = os.path.join(hf_dir, "model.safetensors")
  if os.path.exists(path):
    return load_file(path)
  bin_path = os.path.join(hf_dir, "pytorch_model.bin")
  if os.path.exists(bin_path):
    import torch  # only for old-style checkpoints
    return {k: v.float().numpy() for k, v in torch.load(bin_path, map_location="cpu").items()}
  raise FileNotFoundError(f"{hf_dir} holds neither model.safetensors nor pytorch_model.bin")


def write_json(obj: Any, path: str) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)


def get_path(tree: dict, path: tuple[str, ...]):
  for p in path:
    tree = tree[p]
  return tree


def put_path(tree: dict, path: tuple[str, ...], value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def strip_prefix(state: dict, probe: str, prefixes: tuple[str, ...], family: str) -> dict:
  """Drops the first of `prefixes` (task-head prefixes, then "" for a bare base model) under
  which `probe` exists; the error names what was looked for and what the checkpoint holds."""
  for prefix in prefixes:
    if prefix + probe in state:
      return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
  raise ValueError(f"HF state dict has no {probe!r} under any of the prefixes "
                   f"{tuple(p for p in prefixes if p)} or bare (first keys: {sorted(state)[:3]}); "
                   f"is this a {family} checkpoint?")

