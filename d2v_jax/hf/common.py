"""The parameter walk between our trees and Hugging Face weights, driven by per-modality tables.

A modality's map (hf/<m>.py) declares what differs: `table(cfg)` (which HF module holds which
of our modules, and of what kind), its HF config, its family and prefixes, and the few true
special cases (a mask token the official conversions drop, a pooler we never train). This
module does the rest for every modality: our params -> HF PyTorch state dict and HF Flax tree,
HF state dict -> our params with a check of every name and shape (the expected shapes are
those of our own model's init, eval_shape'd), and the export directory.

Kinds (a module's leaves; our layout -> the HF PyTorch layout):
  dense        kernel (in, out) -> weight (out, in); bias
  dense_nobias kernel only (BEiT's key projection)
  norm         scale -> weight; bias
  embed        embedding -> weight
  conv1d       kernel (k, in/groups, out) -> weight (out, in/groups, k); bias
  conv1d_nobias, conv2d (kernel HWIO -> weight OIHW; bias)
  token        a raw parameter (D,) -> HF's (1, 1, D) (CLS / mask tokens)
  param        a raw parameter, same shape (tables, layer scale)
In HF Flax trees every leaf keeps our layout (Flax kernels are (in, out) / HWIO like ours) under
the HF module path; `token` and `param` leaves take HF's shape and the module's own name.

Our encoder stores its blocks either stacked (nn.scan: params['encoder']['layers']['block'],
leading axis = layer) or one subtree per layer (params['encoder']['layers_i']['block']); the
walk works on one list with a block tree per layer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from d2v_jax import config as config_lib, sharding
from d2v_jax.hf import remote as remote_files   # the remote-code files' locations (no torch)
from d2v_jax.modality import load as load_modality
from d2v_jax.models import data2vec

# config.json field -> our key, for every modality's encoder (hf/<m>.py ARCH extends it): the
# architecture an init.hf directory fixes (d2v_jax/init_weights.py resolve_config).
ENCODER_ARCH = (("num_hidden_layers", "model.encoder.num_layers"),
                ("hidden_size", "model.encoder.hidden"),
                ("num_attention_heads", "model.encoder.heads"),
                ("intermediate_size", "model.encoder.mlp_dim"),
                ("layer_norm_eps", "model.encoder.layer_norm_eps"))

_T = (lambda x: x.T, lambda x: x.T)
_CONV1D = (lambda x: x.transpose(2, 1, 0), lambda x: x.transpose(2, 1, 0))
_CONV2D = (lambda x: x.transpose(3, 2, 0, 1), lambda x: x.transpose(2, 3, 1, 0))
_SAME = (lambda x: x, lambda x: x)
_TOKEN = (lambda x: x.reshape(1, 1, -1), lambda x: x.reshape(-1))
# kind -> ((torch suffix or None, our leaf or None, Flax leaf or None, (to torch, from torch)), ...)
KINDS = {
    "dense": (("weight", "kernel", "kernel", _T), ("bias", "bias", "bias", _SAME)),
    "dense_nobias": (("weight", "kernel", "kernel", _T),),
    "norm": (("weight", "scale", "scale", _SAME), ("bias", "bias", "bias", _SAME)),
    "embed": (("weight", "embedding", "embedding", _SAME),),
    "conv1d": (("weight", "kernel", "kernel", _CONV1D), ("bias", "bias", "bias", _SAME)),
    "conv1d_nobias": (("weight", "kernel", "kernel", _CONV1D),),
    "conv2d": (("weight", "kernel", "kernel", _CONV2D), ("bias", "bias", "bias", _SAME)),
    "token": ((None, None, None, _TOKEN),),
    "param": ((None, None, None, _SAME),),
}


@dataclasses.dataclass(frozen=True)
class Table:
  """Where each HF module lives in our tree. `top`: (HF name, our path from the params root,
  kind); `block`: the same inside one Transformer block, HF names under `layer_prefix`
  ("encoder.layer.{i}") for block i."""
  top: tuple
  block: tuple
  layer_prefix: str


# ---------------------------------------------------------------------------------- tree


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


def get_path(tree: dict, path: tuple[str, ...]):
  for p in path:
    tree = tree[p]
  return tree


def put_path(tree: dict, path: tuple[str, ...], value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _entries(table: Table, num_layers: int):
  """(HF module name, block index or None, our path, kind) of every module."""
  for hf_name, path, kind in table.top:
    yield hf_name, None, path, kind
  for i in range(num_layers):
    for hf_name, path, kind in table.block:
      yield f"{table.layer_prefix.format(i=i)}.{hf_name}", i, path, kind


def _leaf_names(hf_name: str, path: tuple, suffix, leaf) -> tuple[str, tuple]:
  return (f"{hf_name}.{suffix}" if suffix else hf_name), (path + (leaf,) if leaf else path)


# ---------------------------------------------------------------------------- the walk


def to_hf_state(hf_map, params, cfg) -> dict[str, np.ndarray]:
  """Our params (scanned or not, boxed or not) -> the bare HF PyTorch state dict (float32)."""
  hf_map.check_representable(cfg)
  params = unbox(params)
  blocks = layer_list(params["encoder"])
  out: dict[str, np.ndarray] = {}
  for hf_name, i, path, kind in _entries(hf_map.table(cfg), len(blocks)):
    root = params if i is None else blocks[i]
    for suffix, leaf, _, (to_torch, _) in KINDS[kind]:
      name, ours = _leaf_names(hf_name, path, suffix, leaf)
      out[name] = np.ascontiguousarray(to_torch(np.asarray(get_path(root, ours), np.float32)))
  return out


def to_flax_tree(hf_map, params, cfg) -> dict:
  """Our params -> the HF Flax tree of the same model (HF module paths, our leaf layouts)."""
  params = unbox(params)
  blocks = layer_list(params["encoder"])
  tree: dict = {}
  for hf_name, i, path, kind in _entries(hf_map.table(cfg), len(blocks)):
    root = params if i is None else blocks[i]
    for _, leaf, flax_leaf, (to_torch, _) in KINDS[kind]:
      x = np.asarray(get_path(root, path + ((leaf,) if leaf else ())), np.float32)
      key = tuple(hf_name.split(".")) + ((flax_leaf,) if flax_leaf else ())
      put_path(tree, key, np.ascontiguousarray(x if leaf else to_torch(x)))
  return tree


def our_shapes(cfg) -> dict:
  """Shapes of our model's params for cfg ({'embed', 'encoder', ...}; no weights are made)."""
  mod = load_modality(cfg.modality)
  model = data2vec.build(cfg, mod.model.build(cfg))
  batch = jax.tree_util.tree_map(jnp.asarray, mod.data.example_batch(cfg, 1))
  rng = jax.random.PRNGKey(0)
  init = lambda: model.init({"params": rng, "dropout": rng}, batch, cfg.objective == "v2",
                            method=model.init_all)
  with nn.logical_axis_rules(sharding.RULES):
    params = nn.meta.unbox(jax.eval_shape(init)["params"])
  return jax.tree_util.tree_map(lambda x: tuple(x.shape), params)


def expected_shapes(hf_map, cfg) -> dict[str, tuple[int, ...]]:
  """HF PyTorch names and shapes of every weight our model reads, from our own init's shapes."""
  shapes = our_shapes(cfg)
  blocks = layer_list(jax.tree_util.tree_map(np.zeros, shapes["encoder"],
                                             is_leaf=lambda x: isinstance(x, tuple)))
  out = {}
  for hf_name, i, path, kind in _entries(hf_map.table(cfg), cfg.model.encoder.num_layers):
    for suffix, leaf, _, (to_torch, _) in KINDS[kind]:
      name, ours = _leaf_names(hf_name, path, suffix, leaf)
      shape = np.shape(get_path(blocks[i], ours)) if i is not None else get_path(shapes, ours)
      out[name] = tuple(to_torch(np.zeros(shape, np.float32)).shape)
  return out


def strip_prefix(state: dict, probe: str, prefixes: tuple[str, ...], family: str) -> dict:
  """Drops the first of `prefixes` (task-head prefixes, then "" for a bare base model) under
  which `probe` exists; the error names what was looked for and what the checkpoint holds."""
  for prefix in prefixes:
    if prefix + probe in state:
      return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
  raise ValueError(f"HF state dict has no {probe!r} under any of the prefixes "
                   f"{tuple(p for p in prefixes if p)} or bare (first keys: {sorted(state)[:3]}); "
                   f"is this a {family} checkpoint?")


def from_hf_state(hf_map, state: dict, cfg) -> dict:
  """HF state dict (head-prefixed or bare) -> {'embed', 'encoder'} in our layout, layers
  stacked when cfg.model.encoder.scan. Heads, poolers and buffers are ignored; a missing
  weight, one whose shape disagrees with cfg, or a deeper checkpoint raises ValueError naming
  the first such weight. hf_map.complete(state, cfg) first handles its special cases."""
  hf_map.check_representable(cfg)
  state = strip_prefix(state, hf_map.PROBE, hf_map.PREFIXES, hf_map.FAMILY)
  table, layers = hf_map.table(cfg), cfg.model.encoder.num_layers
  prefix = table.layer_prefix.format(i=layers)
  deeper = [name for hf_name, path, kind in table.block for suffix, leaf, _, _ in KINDS[kind]
            for name in [_leaf_names(f"{prefix}.{hf_name}", path, suffix, leaf)[0]] if name in state]
  deeper = deeper or sorted(k for k in state if k.startswith(prefix + "."))
  if deeper:   # named in table order: the block's first weight
    raise ValueError(f"HF weight {deeper[0]!r} exists: the checkpoint is deeper than "
                     f"model.encoder.num_layers={layers}")
  state = hf_map.complete(dict(state), cfg) if hasattr(hf_map, "complete") else state
  for name, want in expected_shapes(hf_map, cfg).items():
    if name not in state:
      raise ValueError(f"HF state dict lacks {name!r} (expected shape {want}): check "
                       f"{hf_map.HINT}, or it is not a {hf_map.FAMILY} encoder")
    got = tuple(np.shape(state[name]))
    if got != want:
      raise ValueError(f"HF weight {name!r} has shape {got} but the config expects {want} "
                       f"(check {hf_map.HINT})")
  out: dict = {}
  blocks: list[dict] = [{} for _ in range(layers)]
  for hf_name, i, path, kind in _entries(table, layers):
    root = out if i is None else blocks[i]
    for suffix, leaf, _, (_, from_torch) in KINDS[kind]:
      name, ours = _leaf_names(hf_name, path, suffix, leaf)
      put_path(root, ours, np.ascontiguousarray(from_torch(np.asarray(state[name], np.float32))))
  out["encoder"] = set_layers(out.get("encoder", {}), blocks, cfg.model.encoder.scan)
  return out


def check_representable(cfg, bad: list[tuple[bool, str]], family: str, needs: str, config: str) -> None:
  """ConfigError for the first (is_bad, what) of `bad`: a setting the HF family cannot hold."""
  for is_bad, what in bad:
    if is_bad:
      raise config_lib.ConfigError(
          f"{what} has no {family} equivalent ({needs}); use the {config} settings to export to "
          "Hugging Face")


# --------------------------------------------------------------------------------- files


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
    import torch  # only for old-style checkpoints (torch is optional for users)
    return {k: v.float().numpy() for k, v in torch.load(bin_path, map_location="cpu").items()}
  raise FileNotFoundError(f"{hf_dir} holds neither model.safetensors nor pytorch_model.bin")


def write_json(obj: Any, path: str) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)


def export(hf_map, params, cfg, out_dir: str, workdir: str) -> None:
  """Writes the HF directory of our model: config.json (hf_map.hf_config, architectures
  [hf_map.ARCHITECTURE]), model.safetensors (PyTorch names, float32), flax_model.msgpack
  (when hf_map.FLAX: the HF Flax class's tree), what hf_map.write_extra adds (tokenizer,
  image processor, feature extractor) and d2v_config.json (the resolved training config)."""
  os.makedirs(out_dir, exist_ok=True)
  hf_cfg = hf_map.write_extra(cfg, out_dir, workdir)
  hf_cfg.architectures = [hf_map.ARCHITECTURE]
  hf_cfg.save_pretrained(out_dir)
  if hasattr(hf_map, "REMOTE"):
    write_remote_code(hf_map.REMOTE, out_dir)
  save_state_dict(to_hf_state(hf_map, params, cfg), out_dir)
  if hf_map.FLAX:
    tree = to_flax_tree(hf_map, params, cfg)
    if hasattr(hf_map, "complete_flax"):
      tree = hf_map.complete_flax(tree, cfg)
    with open(os.path.join(out_dir, "flax_model.msgpack"), "wb") as f:
      f.write(flax.serialization.msgpack_serialize(tree))
  write_json(config_lib.to_dict(cfg), os.path.join(out_dir, "d2v_config.json"))


def write_remote_code(remote: tuple, out_dir: str) -> None:
  """Copies the modeling file (d2v_jax/hf/remote/) next to the weights and points config.json
  at it: its model_type and auto_map (AutoModel & co. load it with trust_remote_code=True)."""
  filename, model_type, classes = remote
  shutil.copy2(remote_files.path(filename), os.path.join(out_dir, filename))
  path = os.path.join(out_dir, "config.json")
  with open(path) as f:
    hf_json = json.load(f)
  module = filename[:-len(".py")]
  hf_json["model_type"] = model_type
  hf_json["auto_map"] = {auto: f"{module}.{cls}" for auto, cls in classes.items()}
  write_json(hf_json, path)


def load(hf_map, path: str, cfg) -> dict:
  """HF directory (model.safetensors or pytorch_model.bin) -> {'embed', 'encoder'} params."""
  return from_hf_state(hf_map, load_state_dict(path), cfg)


def warn(msg: str) -> None:
  print(f"warning: {msg}", file=sys.stderr)
