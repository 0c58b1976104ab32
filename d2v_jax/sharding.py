"""Device mesh from config and the one logical-axis rules table.

Model code names logical axes (parameters: vocab, embed, heads, mlp, layers, conv_*;
activations: act_batch, act_length, act_embed, act_heads, act_mlp). RULES maps them to the
mesh axes `data`, `fsdp`, `tensor`: parameters (and with them the teacher and the optimizer
state, which mirror their shapes) are sharded over `fsdp` along `embed` and over `tensor`
along heads/mlp/vocab; the batch is split over `data` x `fsdp`. A parameter dimension that
the mesh axis does not divide stays replicated on that axis (reported at start-up).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from d2v_jax.config import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

RULES = (
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("conv_kernel", None),
)


class MeshError(ConfigError):
  """A mesh or batch that does not fit the devices; the message names both numbers."""


def mesh_shape(mesh_cfg, n_devices: int) -> tuple[int, ...]:
  """Resolves the single -1 in (data, fsdp, tensor) so the product is n_devices."""
  shape = [int(mesh_cfg[a]) for a in AXES]
  if shape.count(-1) > 1:
    raise MeshError(f"mesh {dict(zip(AXES, shape))}: at most one axis may be -1")
  known = math.prod(s for s in shape if s != -1)
  if any(s == 0 or s < -1 for s in shape):
    raise MeshError(f"mesh {dict(zip(AXES, shape))}: sizes must be positive or -1")
  if -1 in shape:
    if n_devices % known:
      raise MeshError(f"mesh {dict(zip(AXES, shape))} does not fit {n_devices} devices: "
                      f"{n_devices} is not divisible by {known}")
    shape[shape.index(-1)] = n_devices // known
  if math.prod(shape) != n_devices:
    raise MeshError(f"mesh {dict(zip(AXES, shape))} needs {math.prod(shape)} devices but "
                    f"{n_devices} are available; set one axis to -1 or match the device count")
  return tuple(shape)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_cfg, len(devices))
  try:
    arr = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, AssertionError, NotImplementedError):
    arr = np.array(devices).reshape(shape)
  return Mesh(arr, AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def check_batch(global_batch: int, mesh: Mesh, process_count: int = 1) -> None:
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % n:
    raise MeshError(f"batch_size={global_batch} is not divisible by the {n} batch shards "
                    f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")
  if global_batch % process_count:
    raise MeshError(f"batch_size={global_batch} is not divisible by the {process_count} processes")


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops mesh axes that do not divide the dimension they shard."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    out.append(axes if names and dim % size == 0 else None)
  return P(*out)


def shardings_for(abstract_boxed, mesh: Mesh, rules=RULES):
  """Boxed abstract tree (eval_shape of an init returning LogicallyPartitioned leaves) ->
  tree of NamedSharding for the unboxed tree."""
  logical = nn.get_partition_spec(abstract_boxed)
  mesh_specs = nn.logical_to_mesh(logical, rules)
  shapes = nn.meta.unbox(abstract_boxed)
  return jax.tree_util.tree_map(
      lambda spec, x: NamedSharding(mesh, _fit(spec, x.shape, mesh)), mesh_specs, shapes,
      is_leaf=lambda s: isinstance(s, P))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def report(state_shardings, abstract_state) -> tuple[dict, list[str]]:
  """Per-device bytes of params / teacher / optimizer state, and replicated param paths."""
  out, replicated_paths = {}, []
  for name in ("params", "teacher", "opt_state"):
    total = 0
    sh, ab = getattr(state_shardings, name), getattr(abstract_state, name)
    for (path, s), a in zip(jax.tree_util.tree_leaves_with_path(sh), jax.tree_util.tree_leaves(ab)):
      shard = s.shard_shape(a.shape)
      total += math.prod(shard) * a.dtype.itemsize
      if name == "params" and a.ndim >= 1 and math.prod(a.shape) > 1 and tuple(shard) == tuple(a.shape) \
          and len(s.mesh.devices.flat) > 1:
        replicated_paths.append(jax.tree_util.keystr(path))
    out[name] = total
  return out, replicated_paths
