"""Device mesh from config and the one logical-axis rules table.

Model code names logical axes (parameters: vocab, embed, heads, mlp, layers, conv_*;
activations: act_batch, act_length, act_embed, act_heads, act_mlp). RULES maps them to the
mesh axes `data`, `fsdp`, `tensor`: parameters (and with them the teacher and the optimizer
state, which mirror their shapes) are sharded over `fsdp` along `embed` and over `tensor`
along heads/mlp/vocab; the batch is split over `data` x `fsdp`. A parameter dimension that
the mesh axis does not divide stays replicated on that axis (reported at start-up).

Mesh shape (config `mesh`): either explicit sizes `data`, `fsdp`, `tensor` (one may be -1:
"the rest of the devices"), or a preset that sets them:

  preset   data       fsdp  tensor        what is sharded
  dp       -1         1     1             nothing: params, teacher, optimizer replicated
  fsdp     slices     -1    1             params, teacher, optimizer state over fsdp
  fsdp_tp  slices     -1    mesh.tensor   as fsdp, plus heads/mlp/vocab over tensor

Multislice (several TPU slices joined by the data-centre network, DCN): the global axes
above are split into a DCN part and an ICI part. `mesh.dcn_data` x `mesh.dcn_fsdp` must equal
the number of slices (default: all slices on `data`, so only the gradient all-reduce crosses
DCN); the devices are laid out with mesh_utils.create_hybrid_device_mesh so that each
slice holds a contiguous block of every DCN-split axis.
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
PRESETS = ("dp", "fsdp", "fsdp_tp")

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


def _get(mesh_cfg, key: str, default):
  try:
    value = mesh_cfg[key]
  except (KeyError, AttributeError):
    return default
  return default if value is None else value


def num_slices(devices) -> int:
  """Number of TPU slices the devices span (1 for CPU / GPU / a single slice)."""
  return len({getattr(d, "slice_index", 0) or 0 for d in devices})


def dcn_shape(mesh_cfg, slices: int) -> tuple[int, int, int]:
  """(dcn_data, dcn_fsdp, 1): how many slices each axis spans; the product is `slices`."""
  d, f = int(_get(mesh_cfg, "dcn_data", -1)), int(_get(mesh_cfg, "dcn_fsdp", 1))
  if d == -1 and f == -1:
    raise MeshError("mesh.dcn_data and mesh.dcn_fsdp cannot both be -1")
  if d == -1 or f == -1:
    known = f if d == -1 else d
    if known < 1 or slices % known:
      raise MeshError(f"mesh.dcn_{'fsdp' if d == -1 else 'data'}={known} does not divide the "
                      f"{slices} slices")
    d, f = (slices // known, known) if d == -1 else (known, slices // known)
  if d < 1 or f < 1 or d * f != slices:
    raise MeshError(f"mesh.dcn_data={d} x mesh.dcn_fsdp={f} = {d * f} slices, but the devices "
                    f"form {slices} slice(s); make the product equal {slices}")
  return d, f, 1


def _requested(mesh_cfg, dcn: tuple[int, int, int]) -> list[int]:
  """Axis sizes before resolving -1: explicit, or from the preset."""
  preset = _get(mesh_cfg, "preset", "") or ""
  if preset == "":
    return [int(mesh_cfg[a]) for a in AXES]
  if preset not in PRESETS:
    raise MeshError(f"mesh.preset={preset!r} is unknown; use one of {list(PRESETS)} or '' "
                    "(explicit mesh.data / mesh.fsdp / mesh.tensor)")
  if preset == "dp":
    return [-1, 1, 1]
  tensor = int(_get(mesh_cfg, "tensor", 1))
  if preset == "fsdp":
    return [dcn[0], -1, 1]
  if tensor < 2:
    raise MeshError(f"mesh.preset='fsdp_tp' needs mesh.tensor >= 2 (the tensor-parallel "
                    f"degree, e.g. --config.mesh.tensor=4), got mesh.tensor={tensor}")
  return [dcn[0], -1, tensor]


def mesh_shape(mesh_cfg, n_devices: int, slices: int = 1) -> tuple[int, ...]:
  """Resolves the preset and the single -1 in (data, fsdp, tensor) so the product is
  n_devices."""
  dcn = dcn_shape(mesh_cfg, slices)
  shape = _requested(mesh_cfg, dcn)
  named = lambda s: dict(zip(AXES, s))
  if shape.count(-1) > 1:
    raise MeshError(f"mesh {named(shape)}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in shape):
    raise MeshError(f"mesh {named(shape)}: sizes must be positive or -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if n_devices % known:
      raise MeshError(f"mesh {named(shape)} does not fit {n_devices} devices: "
                      f"{n_devices} is not divisible by {known}")
    shape[shape.index(-1)] = n_devices // known
  if math.prod(shape) != n_devices:
    raise MeshError(f"mesh {named(shape)} needs {math.prod(shape)} devices but "
                    f"{n_devices} are available; set one axis to -1 or match the device count")
  for axis, size, across in zip(AXES, shape, dcn):
    if size % across:
      raise MeshError(f"mesh.{axis}={size} is not divisible by the {across} slices it spans "
                      f"(mesh.dcn_{axis}); make mesh.{axis} a multiple of {across}")
  return tuple(shape)


def _hybrid(ici: tuple[int, ...], dcn: tuple[int, ...], devices) -> np.ndarray:
  """Per-slice ICI meshes placed on a DCN grid: axis i = dcn[i] blocks of ici[i] devices."""
  try:
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  except (ValueError, AssertionError, NotImplementedError, AttributeError):
    pass
  by_slice: dict[int, list] = {}
  for d in sorted(devices, key=lambda d: d.id):
    by_slice.setdefault(getattr(d, "slice_index", 0) or 0, []).append(d)
  blocks = np.array([np.array(v).reshape(ici) for _, v in sorted(by_slice.items())])
  blocks = blocks.reshape(dcn + ici)               # (a, b, c, x, y, z)
  n = len(ici)
  order = [k for i in range(n) for k in (i, n + i)]  # (a, x, b, y, c, z)
  return blocks.transpose(order).reshape([a * b for a, b in zip(dcn, ici)])


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """Mesh with axes (data, fsdp, tensor) over `devices` (default: all), preset and
  multislice layout applied."""
  devices = list(devices if devices is not None else jax.devices())
  slices = num_slices(devices)
  shape = mesh_shape(mesh_cfg, len(devices), slices)
  if slices > 1:
    dcn = dcn_shape(mesh_cfg, slices)
    ici = tuple(s // d for s, d in zip(shape, dcn))
    return Mesh(_hybrid(ici, dcn, devices), AXES)
  try:
    arr = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, AssertionError, NotImplementedError):
    arr = np.array(devices).reshape(shape)
  return Mesh(arr, AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
  """How many pieces the batch is split into (data x fsdp)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch(global_batch: int, mesh: Mesh, process_count: int = 1) -> None:
  n = batch_shards(mesh)
  if global_batch % n:
    raise MeshError(f"batch_size={global_batch} is not divisible by the {n} batch shards "
                    f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}); "
                    f"use a multiple of {n}")
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
  """Per-device bytes of params / teacher / optimizer state, and the paths of parameters
  (more than one element) that every device holds whole although the mesh has > 1 device."""
  out, replicated_paths = {}, []
  for name in ("params", "teacher", "opt_state"):
    total = 0
    sh, ab = getattr(state_shardings, name), getattr(abstract_state, name)
    for (path, s), a in zip(jax.tree_util.tree_leaves_with_path(sh), jax.tree_util.tree_leaves(ab)):
      shard = s.shard_shape(a.shape)
      total += math.prod(shard) * a.dtype.itemsize
      if name == "params" and math.prod(a.shape) > 1 and tuple(shard) == tuple(a.shape) \
          and s.mesh.devices.size > 1:
        replicated_paths.append(jax.tree_util.keystr(path))
    out[name] = total
  return out, replicated_paths


def report_line(mesh: Mesh, sizes: dict, replicated_paths: list[str]) -> str:
  """One start-up line: mesh, per-device MiB of each state part, replicated parameters."""
  shown = ", ".join(replicated_paths[:4]) + (" ..." if len(replicated_paths) > 4 else "")
  return (f"mesh {dict(mesh.shape)} | per-device MiB: "
          + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in sizes.items())
          + f" | replicated params: {len(replicated_paths)}" + (f" ({shown})" if shown else ""))
