"""TPU topologies for ahead-of-time compiles on a machine without a TPU: chips (HBM, peak
bf16 FLOP/s, bandwidths), slice shapes from accelerator-type names, the compile-only devices
libtpu gives for them (or as many fake CPU devices when libtpu is absent), and the roofline
bound of a step on a chip."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

# libtpu takes a process-wide lock file on load; compiling for a topology needs no TPU, so
# let several compile/test processes (and a trainer) load it side by side.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
from jax.experimental import topologies  # noqa: E402

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One JAX device of a TPU generation (v4 and v5p: a megacore chip of 2 TensorCores)."""
  name: str
  libtpu: str            # generation name in libtpu topology strings
  hbm_gib: float
  peak_tflops: float     # bf16 dense
  hbm_gbps: float        # HBM bandwidth, GB/s
  ici_gbps: float        # bidirectional inter-chip interconnect per chip, GB/s
  cores_per_chip: int    # TensorCores per chip (accelerator-type suffix counts cores)
  host_bounds: tuple     # chips per host, as (x, y, z)
  dims: int              # 2-D or 3-D torus
  chip_config: str = "default"


# Peak bf16 compute and HBM bandwidth per chip: Cloud TPU documentation
# (docs.cloud.google.com/tpu/docs/v4, v5e, v5p, v6e). HBM is what the TPU compiler of
# libtpu 0.0.42 offers a program (its out-of-memory message says so): physical capacity
# 32 / 16 / 95 / 32 GB minus what the runtime keeps. ICI is bidirectional per chip.
CHIPS = {
    "v4": Chip("TPU v4", "v4", 30.75, 275, 1200, 600, 2, (2, 2, 1), 3, "megacore"),
    "v5e": Chip("TPU v5e", "v5e", 15.75, 197, 819, 400, 1, (2, 4, 1), 2),
    "v5p": Chip("TPU v5p", "v5", 95.74, 459, 2765, 600, 2, (2, 2, 1), 3),
    "v6e": Chip("TPU v6e", "v6e", 31.25, 918, 1640, 800, 1, (2, 4, 1), 2),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}

SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
             128: (8, 16), 256: (16, 16)}
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
             128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
             2048: (8, 16, 16), 4096: (16, 16, 16)}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str              # as given, e.g. v5e-8
  chip: Chip
  shape: tuple           # chips per slice along each torus axis
  num_slices: int = 1

  @property
  def chips_per_slice(self) -> int:
    return math.prod(self.shape)

  @property
  def num_devices(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def libtpu_name(self) -> str:
    return f"{self.chip.libtpu}:{'x'.join(map(str, self.shape))}"

  def describe(self) -> str:
    s = f" x {self.num_slices} slices" if self.num_slices > 1 else ""
    return f"{self.name} ({self.chip.name}, {self.libtpu_name}{s}, {self.num_devices} devices)"


def parse_topology(name: str, num_slices: int = 1) -> Topology:
  """`v5e-8`, `v5litepod-16`, `v4-8` (cores), `v5p-16` (cores), `v6e-8`, or `v5e:2x4`."""
  def bad(why: str):
    return ValueError(f"--topology={name!r}: {why}. Use an accelerator type such as v5e-8, "
                      f"v4-8, v5p-8, v6e-8 or a libtpu name such as v5e:2x4 / v4:2x2x1")
  if num_slices < 1:
    raise ValueError(f"--num_slices={num_slices} must be >= 1")
  m = re.fullmatch(r"([a-z0-9]+?)[-:](.+)", name.strip().lower())
  if not m:
    raise bad("not of the form <generation>-<size>")
  gen, size = m.groups()
  gen = _ALIASES.get(gen, gen)
  if gen not in CHIPS:
    raise bad(f"unknown TPU generation {gen!r} (known: {sorted(CHIPS)})")
  chip = CHIPS[gen]
  if "x" in size:
    shape = tuple(int(s) for s in size.split("x"))
    if len(shape) == 2 and chip.dims == 3:
      shape = shape + (1,)
    if len(shape) != chip.dims:
      raise bad(f"{chip.name} slices are {chip.dims}-D (e.g. {'2x2x1' if chip.dims == 3 else '2x4'})")
  else:
    n = int(size)
    if n % chip.cores_per_chip:
      raise bad(f"{gen}-N counts TensorCores ({chip.cores_per_chip} per chip); N must be even")
    chips = n // chip.cores_per_chip
    table = SHAPES_3D if chip.dims == 3 else SHAPES_2D
    if chips not in table:
      sizes = [k * chip.cores_per_chip for k in table]
      raise bad(f"no standard slice with {chips} chips (sizes: {sizes})")
    shape = table[chips]
  return Topology(name, chip, shape, num_slices)


def tpu_compiler_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def topology_devices(topo: Topology) -> list:
  """Compile-only TPU devices of the topology (needs libtpu, no TPU)."""
  bounds = tuple(min(b, s) for b, s in zip(topo.chip.host_bounds, topo.shape + (1,) * (3 - len(topo.shape))))
  desc = topologies.get_topology_desc(
      platform="tpu", topology_name=topo.libtpu_name, chip_config_name=topo.chip.chip_config,
      chips_per_host_bounds=bounds, num_slices=topo.num_slices, wrap=(False, False, False))
  return list(desc.devices)


def target_devices(topo: Topology, force_cpu: bool = False) -> tuple[list, str]:
  """The topology's TPU devices, or (fallback) as many CPU devices, with a backend label."""
  reason = "forced with --fallback" if force_cpu else ""
  if not reason and not tpu_compiler_available():
    reason = "libtpu is not installed (pip install -r requirements-tpu.txt)"
  if not reason:
    try:
      return topology_devices(topo), "tpu"
    except Exception as e:  # noqa: BLE001 - any libtpu failure means: no TPU compiler here
      reason = f"TPU topology unavailable: {str(e).splitlines()[0][:200]}"
  cpus = jax.devices("cpu")
  if len(cpus) < topo.num_devices:
    raise ValueError(f"TPU compilation is not available ({reason}) and the CPU fallback needs "
                     f"{topo.num_devices} devices but {len(cpus)} exist; run with "
                     f"XLA_FLAGS=--xla_force_host_platform_device_count={topo.num_devices}")
  return cpus[:topo.num_devices], f"cpu-fallback: {reason}"


def roofline(flops: float, bytes_accessed: float, chip: Chip) -> tuple[float, float, float, str]:
  """(compute floor s, HBM time s, bound s, what bounds it) for one device's step."""
  compute = flops / (chip.peak_tflops * 1e12)
  hbm = bytes_accessed / (chip.hbm_gbps * 1e9)
  if compute <= 0 and hbm <= 0:
    return 0.0, 0.0, 0.0, ""
  return compute, hbm, max(compute, hbm), ("compute" if compute >= hbm else "HBM bytes")
