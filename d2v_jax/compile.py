"""Ahead-of-time compile of the real train step for a TPU topology, on a machine without one.

  python -m d2v_jax.compile --config configs/text.py:variant=base --topology v5e-8
  python -m d2v_jax.compile --config configs/text.py:variant=large --topology v5p-8 \
      --config.mesh.preset=fsdp --config.dtype=bfloat16 --batch_per_device=16
  python -m d2v_jax.compile --config configs/vision.py:variant=base --topology v5e-16 --num_slices=2
  python -m d2v_jax.compile --config configs/text.py:variant=base --topology v6e-8 --search_batch
  python -m d2v_jax.compile --table docs/scale.md   # regenerates the README table (slow)

The step is d2v_jax.build.build(cfg, devices=<topology devices>).step, lowered with the
abstract (sharded) state and batch, i.e. exactly what the trainer runs (attention and remat
choices made for a TPU host: model.encoder.platform=tpu). Printed, per device:

  memory    compiler-exact: arguments, outputs, temporaries, code; total vs the chip's HBM
  FLOPs     compiled (XLA's cost analysis of the compiled step, loop bodies scaled by their
            trip counts) and analytic (model FLOPs: matmuls of the teacher forward, student
            forward with head, student backward = 2x)
  bound     a roofline LOWER BOUND on the step time, not a measurement, with what bounds it:
            compute = compiled FLOPs at the chip's peak bf16 rate (a hard floor), HBM =
            XLA's "bytes accessed" at the chip's bandwidth (the compiler's per-op count; real
            traffic can be lower where fusions reuse on-chip memory). Collectives, the host
            input pipeline and imperfect overlap come on top. No MFU is printed: MFU is a
            measured step time's figure (python -m d2v_jax.bench gpu / mfu measure one).

  --search_batch                 largest batch per device that fits the chip's HBM
  --search_batch --remat all     ... for each remat policy (none, full, minimal, save_dots,
                                 save_qkv_out, offload), one table row each
  --remat full,minimal           compile at --batch_per_device with each policy
  --max_trials N                 compiles per search (default 6; fewer: the edge is a bound)

Topology names: Cloud TPU accelerator types (v4-8, v5p-8: TensorCores; v5e-8 / v5litepod-8,
v6e-8: chips) or libtpu names (v5e:2x4, v4:2x2x1). TPU compilation needs libtpu
(requirements-tpu.txt); without it the step is compiled for the same number of fake CPU
devices instead, and the report says so (CPU memory figures, TPU chip limits).

Exit status: 0 fits, 3 does not fit the chip's HBM (message on stderr), 2 bad input.

FLOPs: XLA's cost analysis counts the body of a loop (nn.scan over layers) once. The figure
printed adds the missing iterations' matmul FLOPs, counted on the traced step (whose scan
lengths are known); HBM bytes are scaled by the same factor. Remat recomputation shows in the
compiled FLOPs, not in the analytic ones.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from d2v_jax import console  # noqa: F401,E402  (first: quiet console, d2v_jax/console.py)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# libtpu takes a process-wide lock file on load; compiling for a topology needs no TPU, so
# let several compile/test processes (and a trainer) load it side by side.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Silences libtpu's "could not determine TPU accelerator type / worker hostnames" noise.
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

GiB = 2**30

EXIT_OK, EXIT_BAD_INPUT, EXIT_NO_FIT = 0, 2, 3


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
  from jax.experimental import topologies
  bounds = tuple(min(b, s) for b, s in zip(topo.chip.host_bounds, topo.shape + (1,) * (3 - len(topo.shape))))
  desc = topologies.get_topology_desc(
      platform="tpu", topology_name=topo.libtpu_name, chip_config_name=topo.chip.chip_config,
      chips_per_host_bounds=bounds, num_slices=topo.num_slices, wrap=(False, False, False))
  return list(desc.devices)


# ---------------------------------------------------------------------------- FLOP counts


def _subjaxprs(params) -> list:
  """Jaxprs held in an equation's params (pjit, scan, cond branches, remat, custom_vjp...)."""
  from jax.extend import core as jcore
  out = []
  for v in params.values():
    for x in (v if isinstance(v, (tuple, list)) else (v,)):
      if isinstance(x, jcore.ClosedJaxpr):
        out.append(x.jaxpr)
      elif isinstance(x, jcore.Jaxpr):
        out.append(x)
  return out


def _dot_flops(eqn) -> float:
  lhs = eqn.invars[0].aval.shape
  (lc, _), _ = eqn.params["dimension_numbers"]
  out = eqn.outvars[0].aval.shape
  return 2.0 * math.prod(out) * math.prod(lhs[d] for d in lc)


def _conv_flops(eqn) -> float:
  rhs = eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  dn = eqn.params["dimension_numbers"]
  out_feat = rhs[dn.rhs_spec[0]]
  return 2.0 * math.prod(out) * math.prod(rhs) / out_feat / eqn.params.get("batch_group_count", 1)


def matmul_flops(jaxpr, scale_loops: bool = True) -> float:
  """Dot and convolution FLOPs of a jaxpr (global shapes). scan bodies count `length` times
  (with scale_loops=False: as many times as XLA's loop body holds them, which is what its
  cost analysis counts); cond takes its costliest branch; while loops count once (their trip
  count is not static). The step's "metrics" scope (health statistics such as the in-step
  effective rank's covariance) is not model compute and is left out."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if "metrics" in str(eqn.source_info.name_stack).split("/"):
      continue
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    subs = [matmul_flops(j, scale_loops) for j in _subjaxprs(eqn.params)]
    if not subs:
      continue
    if name == "cond":
      total += max(subs)
    elif name == "scan":
      # XLA's loop body holds `unroll` copies of the scan body and runs length/unroll times.
      length, unroll = eqn.params["length"], eqn.params.get("unroll", 1)
      copies = length if unroll is True or int(unroll) >= length else max(int(unroll), 1)
      total += (length if scale_loops else copies) * sum(subs)
    else:
      total += sum(subs)
  return total


def head_flops_per_token(d: int, layers: int, mult: int) -> float:
  """Regression head (d2v_jax/models/data2vec.RegressionHead) matmul FLOPs per position."""
  if layers <= 1:
    return 2.0 * d * d
  h = d * mult
  return 2.0 * d * h + (layers - 2) * 2.0 * h * h + 2.0 * h * d


def encoder_flops_per_token(enc, seq_len: int) -> float:
  """One Transformer block's forward matmul FLOPs per position: q, k, v, out projections,
  the two FFN matmuls, and the attention scores and weighted sum over seq_len keys."""
  d, m = enc.hidden, enc.mlp_dim
  return 8.0 * d * d + 4.0 * d * m + 4.0 * seq_len * d


def analytic_flops(cfg, batch: int, seq_len: int, embed_teacher: float = 0.0,
                   embed_student: float = 0.0) -> dict:
  """Model FLOPs of one step (global): teacher forward + student forward (with head) +
  student backward (2x its forward). seq_len counts every encoder position (CLS included)."""
  enc = cfg.model.encoder
  tokens = batch * seq_len
  layer = encoder_flops_per_token(enc, seq_len)
  teacher = tokens * enc.num_layers * layer + embed_teacher
  student = tokens * (enc.num_layers * layer + head_flops_per_token(
      enc.hidden, cfg.head.layers, cfg.head.hidden_mult)) + embed_student
  return {"teacher_fwd": teacher, "student_fwd": student, "student_bwd": 2 * student,
          "total": teacher + 3 * student}


def decoder_flops_per_position(cfg) -> float:
  """data2vec 2.0 conv decoder (d2v_jax/models/decoder.py) forward FLOPs per position."""
  d = cfg.v2.decoder
  window = d.kernel ** (2 if d.kind == "2d" else 1)
  cin, total = cfg.model.encoder.hidden, 0.0
  for _ in range(d.layers):
    total += 2.0 * window * (cin // d.groups) * d.dim
    cin = d.dim
  cur = d.dim
  for i in range(d.proj_layers - 1):
    nxt = int(cur * d.proj_ratio) if i == 0 else cur
    total += 2.0 * cur * nxt
    cur = nxt
  return total + 2.0 * cur * cfg.model.encoder.hidden


def analytic_flops_v2(cfg, batch: int, seq_len: int, visible: int, positions: int,
                      embed_teacher: float = 0.0, embed_student: float = 0.0) -> dict:
  """data2vec 2.0: the teacher on B full sequences (seq_len incl. extra tokens), the student
  on B x M clones of `visible` + extra tokens, the decoder on all `positions` of every clone;
  backward = 2x the student's forward (embed_student: the local features, computed once)."""
  enc = cfg.model.encoder
  m = int(cfg.v2.clone_batch)
  extra = seq_len - positions
  teacher = batch * seq_len * enc.num_layers * encoder_flops_per_token(enc, seq_len) + embed_teacher
  k = visible + extra
  student = (batch * m * k * enc.num_layers * encoder_flops_per_token(enc, k)
             + batch * m * positions * decoder_flops_per_position(cfg) + embed_student)
  return {"teacher_fwd": teacher, "student_fwd": student, "student_bwd": 2 * student,
          "total": teacher + 3 * student}


# ----------------------------------------------------------------------------- compiling


@dataclasses.dataclass
class Report:
  topology: str
  backend: str                      # "tpu" or "cpu-fallback (...)"
  num_devices: int
  mesh: dict
  preset: str
  dtype: str
  global_batch: int
  batch_per_device: int
  seq_len: int
  fits: bool
  hbm_bytes: float
  memory: dict                      # per device: argument, output, alias, temp, code, total
  state_bytes: dict                 # per device: params / teacher / opt_state (sharding.report)
  replicated_params: int
  xla_flops_raw: float              # per device, XLA cost analysis (loop bodies once)
  flops_per_device: float           # per device, loop bodies scaled by their trip counts
  model_flops: float                # per step, global, analytic
  model_flops_parts: dict
  traced_matmul_flops: float        # global, traced step, loops scaled
  bytes_per_device: float           # XLA "bytes accessed" per device, loop bodies scaled
  compute_bound_s: float            # flops_per_device at the chip's peak bf16 rate (hard floor)
  hbm_bound_s: float                # bytes_per_device at the chip's HBM bandwidth
  bound_s: float                    # max of the two: roofline lower bound on the step time
  bound_by: str                     # "compute" | "HBM bytes" ("" without compiled figures)
  compile_s: float
  remat: str = "none"
  attention: str = ""               # transformer.describe_attention for the target platform
  peak_tflops: float = 0.0          # chip figures the bound used
  hbm_gbps: float = 0.0
  error: str = ""

  def lines(self) -> list[str]:
    mem = self.memory
    g = lambda b: f"{b / GiB:.2f} GiB" if b >= GiB / 4 else f"{b / 2**20:.1f} MiB"
    out = [
        f"topology      {self.topology} [{self.backend}]",
        f"mesh          {self.mesh} preset={self.preset or 'explicit'} dtype={self.dtype} "
        f"remat={self.remat}",
        f"batch         {self.global_batch} global = {self.batch_per_device} per batch shard; "
        f"{self.seq_len} positions per example",
        "state/device  " + ", ".join(f"{k} {g(v)}" for k, v in self.state_bytes.items())
        + f"; {self.replicated_params} replicated params",
    ]
    if self.attention:
      out.append(f"attention     {self.attention}")
    if mem:
      out.append(f"memory/device arguments {g(mem['argument'])}, outputs {g(mem['output'])} "
                 f"(aliased {g(mem['alias'])}), temporaries {g(mem['temp'])}, code {g(mem['code'])}"
                 " (compiler-exact)")
      out.append(f"              total {g(mem['total'])} of {g(self.hbm_bytes)} HBM "
                 f"({100 * mem['total'] / self.hbm_bytes:.0f}%) -> "
                 + ("fits" if self.fits else "DOES NOT FIT"))
    if self.error:
      out.append(f"compiler      {self.error}")
    if self.flops_per_device:
      per_dev = self.model_flops / self.num_devices
      out += [
          f"FLOPs/step    compiled {self.flops_per_device:.4g} per device (XLA cost analysis; "
          f"{self.xla_flops_raw:.4g} with loop bodies once)",
          f"              analytic {self.model_flops:.4g} global = {per_dev:.4g} per device "
          f"(model FLOPs; compiled / analytic = {self.flops_per_device / per_dev:.2f})",
      ]
    if self.bound_s:
      ex_s = self.global_batch / self.num_devices / self.bound_s
      out += [
          f"bound         step >= {1e3 * self.bound_s:.1f} ms, bound by {self.bound_by} "
          f"(roofline LOWER BOUND from the compiler's counts, not a measurement)",
          f"              compute {1e3 * self.compute_bound_s:.1f} ms = compiled FLOPs at "
          f"{self.peak_tflops:g} TFLOP/s (peak bf16); HBM {1e3 * self.hbm_bound_s:.1f} ms = "
          f"{self.bytes_per_device:.4g} bytes accessed at {self.hbm_gbps:g} GB/s",
          f"              <= {ex_s:.1f} examples/s per device; collectives, input and "
          "imperfect overlap not included",
      ]
    out.append(f"compile time  {self.compile_s:.0f} s")
    return out


def roofline(flops: float, bytes_accessed: float, chip: Chip) -> tuple[float, float, float, str]:
  """(compute floor s, HBM time s, bound s, what bounds it) for one device's step."""
  compute = flops / (chip.peak_tflops * 1e12)
  hbm = bytes_accessed / (chip.hbm_gbps * 1e9)
  if compute <= 0 and hbm <= 0:
    return 0.0, 0.0, 0.0, ""
  return compute, hbm, max(compute, hbm), ("compute" if compute >= hbm else "HBM bytes")


def resolve_for_compile(cfg, backend: str = "tpu") -> None:
  """Fills data-dependent config values without reading data (modality prepare() would
  read the corpus): a text vocabulary is the size the tokenizer would be trained to. For a
  TPU target, choices the model makes from the tracing host's backend are made as a TPU
  host would make them, so the program is the one the trainer compiles there."""
  if "vocab_size" in cfg.model and cfg.model.vocab_size is None and "vocab_size" in cfg.data:
    cfg.model.vocab_size = int(cfg.data.vocab_size)
  from d2v_jax.models import transformer
  fields = {f.name for f in dataclasses.fields(transformer.EncoderSpec)}
  enc = cfg.model.encoder
  if backend == "tpu" and "scan_unroll" in fields and not enc.get("scan_unroll", 0):
    with cfg.unlocked():    # config_flags locks the config; the key may be new
      enc.scan_unroll = 1   # transformer.Encoder: 0 = unroll everything on CPU, 1 elsewhere
  if backend == "tpu" and "platform" in fields and not enc.get("platform", ""):
    with cfg.unlocked():
      enc.platform = "tpu"  # transformer.select_attention: attention=auto chooses for a TPU


def _oom_message(err: Exception) -> str | None:
  text = str(err)
  if "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "out of memory" in text.lower():
    line = next((l for l in text.splitlines() if "memory" in l.lower()), text.splitlines()[0])
    return line.strip()[:300]
  return None


def compile_step(cfg, topo: Topology, *, devices=None, backend: str = "tpu") -> Report:
  """Builds the trainer's step for `devices` (the topology's), compiles it, and reports."""
  import flax.linen as nn
  import jax

  from d2v_jax import build as build_lib, sharding
  from d2v_jax.models import transformer

  resolve_for_compile(cfg, "tpu" if backend == "tpu" else "cpu")
  t0 = time.time()
  built = build_lib.build(cfg, devices=devices)
  mesh = built.mesh
  sharding.check_batch(cfg.batch_size, mesh)
  state = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                 built.abstract_state, built.state_shardings)
  batch = build_lib.abstract_batch(cfg, built.modality, built.batch_shardings)
  sizes, repl = sharding.report(built.state_shardings, built.abstract_state)

  # Traced matmul FLOPs (global): with scan bodies scaled by their length, and once.
  with nn.logical_axis_rules(sharding.RULES), jax.set_mesh(mesh):
    jaxpr = jax.make_jaxpr(built.step_fn)(built.abstract_state, batch).jaxpr
  traced, traced_once = matmul_flops(jaxpr, True), matmul_flops(jaxpr, False)

  # Encoder sequence length and the embedder's own FLOPs (patch / conv front-ends).
  params = built.abstract_state.params
  local = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)

  def embed_only(p, b, student):
    return built.model.apply({"params": p}, b, student=student, deterministic=True,
                             method=lambda m, b, student, deterministic: m.embed(
                                 b, student=student, deterministic=deterministic))

  v2 = cfg.get("objective", "v1") == "v2"   # v2 batches carry [B, M, T] masks: no masked view
  with nn.logical_axis_rules(sharding.RULES), jax.set_mesh(mesh):
    emb_s = jax.make_jaxpr(lambda p, b: embed_only(p, b, not v2))(params, local)
    emb_t = jax.make_jaxpr(lambda p, b: embed_only(p, b, False))(params, local)
    x_shape = jax.eval_shape(lambda p, b: embed_only(p, b, not v2), params, local)[0].shape
  seq_len = x_shape[1]
  if v2:
    shared = cfg.teacher.get("share_local", False)
    model = analytic_flops_v2(cfg, cfg.batch_size, seq_len, local["visible"].shape[-1],
                              local["mask"].shape[-1],
                              0.0 if shared else matmul_flops(emb_t.jaxpr), matmul_flops(emb_s.jaxpr))
  else:
    model = analytic_flops(cfg, cfg.batch_size, seq_len, matmul_flops(emb_t.jaxpr),
                           matmul_flops(emb_s.jaxpr))

  n = mesh.devices.size
  hbm = topo.chip.hbm_gib * GiB
  err, mem, fits = "", {}, True
  xla_raw = flops_dev = bytes_dev = 0.0
  try:
    compiled = built.step.lower(state, batch).compile()
  except Exception as e:  # noqa: BLE001 - the TPU compiler reports OOM as a runtime error
    msg = _oom_message(e)
    if msg is None:
      raise
    err, fits = msg, False
  else:
    ma = compiled.memory_analysis()
    mem = {"argument": ma.argument_size_in_bytes, "output": ma.output_size_in_bytes,
           "alias": ma.alias_size_in_bytes, "temp": ma.temp_size_in_bytes,
           "code": ma.generated_code_size_in_bytes}
    mem["total"] = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"] + mem["code"]
    fits = mem["total"] <= hbm
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    xla_raw = float(ca.get("flops", 0.0))
    flops_dev = xla_raw + (traced - traced_once) / n
    scale = flops_dev / xla_raw if xla_raw > 0 else 1.0
    bytes_dev = float(ca.get("bytes accessed", 0.0)) * scale  # loop bodies scaled alike
  compute_s, hbm_s, bound_s, bound_by = roofline(flops_dev, bytes_dev, topo.chip)
  spec = transformer.EncoderSpec.from_config(cfg.model.encoder, cfg.dtype)
  return Report(
      topology=topo.describe(), backend=backend, num_devices=n, mesh=dict(mesh.shape),
      preset=str(cfg.mesh.get("preset", "") or ""), dtype=cfg.dtype, global_batch=cfg.batch_size,
      batch_per_device=cfg.batch_size // sharding.batch_shards(mesh), seq_len=seq_len, fits=fits,
      hbm_bytes=hbm, memory=mem, state_bytes=sizes, replicated_params=len(repl),
      xla_flops_raw=xla_raw, flops_per_device=flops_dev, model_flops=model["total"],
      model_flops_parts=model, traced_matmul_flops=traced, bytes_per_device=bytes_dev,
      compute_bound_s=compute_s, hbm_bound_s=hbm_s, bound_s=bound_s, bound_by=bound_by,
      compile_s=time.time() - t0, remat=transformer.remat_policy(spec.remat)[0],
      attention=transformer.describe_attention(spec, transformer.attention_platform(spec)),
      peak_tflops=topo.chip.peak_tflops, hbm_gbps=topo.chip.hbm_gbps, error=err)


def target_devices(topo: Topology, force_cpu: bool = False) -> tuple[list, str]:
  """The topology's TPU devices, or (fallback) as many CPU devices, with a backend label."""
  import jax
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


def with_batch_per_device(cfg, per_device: int, topo: Topology) -> None:
  """Sets the global batch so each batch shard (data x fsdp) holds `per_device` examples."""
  from d2v_jax import sharding
  shape = sharding.mesh_shape(cfg.mesh, topo.num_devices, topo.num_slices)
  cfg.batch_size = per_device * shape[0] * shape[1]


def search_batch(cfg, topo: Topology, devices, backend: str, start: int = 8,
                 max_trials: int = 6, log=print) -> tuple[int, int | None, dict]:
  """Largest per-device batch that fits HBM: compile at `start`, then jump to the batch a
  linear memory model (fixed state + per-example temporaries) predicts, then bisect.
  Returns (largest fitting, smallest failing or None, {batch: Report})."""
  lo, hi, seen = 0, None, {}
  b = start
  for _ in range(max_trials):
    c = cfg.copy_and_resolve_references()
    with_batch_per_device(c, b, topo)
    r = compile_step(c, topo, devices=devices, backend=backend)
    seen[b] = r
    log(f"  batch/device {b:5d}: " + (f"{r.memory['total'] / GiB:6.2f} GiB" if r.memory else "compiler OOM")
        + (" fits" if r.fits else " does not fit") + f" ({r.compile_s:.0f} s)")
    if r.fits:
      lo = max(lo, b)
    else:
      hi = b if hi is None else min(hi, b)
    if hi is not None and hi - lo <= max(1, lo // 8):
      break
    b = _next_batch(lo, hi, seen, topo.chip.hbm_gib * GiB)
    if b is None:
      break
  return lo, hi, seen


def remat_names(arg: str) -> list[str]:
  """--remat value -> canonical policy names ("all" = every policy; "dots" = save_dots)."""
  from d2v_jax.models import transformer
  names = list(transformer.REMAT_POLICIES) if arg.strip() == "all" else [
      x.strip() for x in arg.split(",") if x.strip()]
  out = []
  for name in names:
    canon, _ = transformer.remat_policy(name)   # ValueError names the valid ones
    if canon not in out:
      out.append(canon)
  return out


def search_remat(cfg, topo: Topology, devices, backend: str, policies: list[str],
                 start: int = 8, max_trials: int = 6, log=print) -> list[dict]:
  """search_batch for each remat policy (each search starts at the batch the previous policy
  reached). Returns one row per policy: remat, largest_batch, first_failing, report."""
  rows = []
  for policy in policies:
    c = cfg.copy_and_resolve_references()
    c.model.encoder.remat = policy
    log(f"remat={policy}")
    lo, hi, seen = search_batch(c, topo, devices, backend, start, max_trials, log=log)
    rows.append({"remat": policy, "largest_batch": lo, "first_failing": hi,
                 "report": seen.get(lo)})
    start = max(lo, 1) if lo else start
  return rows


def remat_table(rows: list[dict]) -> str:
  """Markdown: largest batch per device, memory at it and the roofline bound, per policy."""
  lines = ["| remat | largest batch / device | memory / device at it | compiled FLOPs / device "
           "| roofline bound / step | bound by | <= examples/s / device |",
           "|---|---|---|---|---|---|---|"]
  for row in rows:
    r = row["report"]
    if r is None:
      lines.append(f"| {row['remat']} | none fits | - | - | - | - | - |")
      continue
    edge = (f"{row['largest_batch']} ({row['first_failing']} does not fit)" if row["first_failing"]
            else f">= {row['largest_batch']} (search stopped)") if "largest_batch" in row else (
            f"{r.batch_per_device}" + ("" if r.fits else " (does not fit)"))
    mem = f"{r.memory['total'] / GiB:.2f} of {r.hbm_bytes / GiB:.2f} GiB" if r.memory else "compiler OOM"
    bound = f"{1e3 * r.bound_s:.0f} ms" if r.bound_s else "-"
    ex = f"{r.global_batch / r.num_devices / r.bound_s:.1f}" if r.bound_s else "-"
    lines.append(f"| {row['remat']} | {edge} | {mem} | {r.flops_per_device / 1e12:.2f} T | "
                 f"{bound} | {r.bound_by or '-'} | {ex} |")
  return "\n".join(lines)


def _predict(seen: dict, hbm: float) -> int | None:
  """Largest batch a linear memory model (through the compiled points) puts under HBM."""
  pts = sorted((b, r.memory["total"]) for b, r in seen.items() if r.memory)
  if len(pts) >= 2:
    (b1, m1), (b2, m2) = pts[-2], pts[-1]
    if m2 > m1:
      return int(b1 + (hbm - m1) * (b2 - b1) / (m2 - m1))
  elif len(pts) == 1:
    b1 = pts[0][0]
    r = seen[b1]
    per_example = r.memory["temp"] / b1          # the state and code do not grow with the batch
    if per_example > 0:
      return int((hbm - (r.memory["total"] - r.memory["temp"])) / per_example)
  return None


def _next_batch(lo: int, hi: int | None, seen: dict, hbm: float) -> int | None:
  """Next batch to compile, or None when lo / hi are as tight as the search goes."""
  guess = _predict(seen, hbm)
  if hi is None:
    if lo == 0:                                   # nothing fits yet
      nxt = guess if guess is not None and 0 < guess < min(seen) else min(seen) // 2
    elif guess is not None and guess > lo:
      nxt = min(guess, lo * 8)
    else:                                         # the model says lo is the edge: probe above
      nxt = lo + max(1, lo // 8)
  else:
    nxt = guess if guess is not None and lo < guess < hi else (lo + hi) // 2
  if nxt < 1 or nxt <= lo or (hi is not None and nxt >= hi) or nxt in seen:
    return None
  return nxt


# ---------------------------------------------------------------------------------- table

TABLE_ENTRIES = ("text:base", "text:large", "vision:base", "vision:large", "audio:base",
                 "audio:large")
TABLE_TOPOLOGIES = ("v5e-8", "v5p-8")
TABLE_OVERRIDES = ("dtype=bfloat16", "mesh.preset=fsdp")


TABLE_CACHE = "docs/scale.jsonl"


def table(path: str, entries=TABLE_ENTRIES, topologies=TABLE_TOPOLOGIES,
          overrides=TABLE_OVERRIDES, start: int = 8, max_trials: int = 5, force_cpu=False,
          cache_path: str = TABLE_CACHE) -> None:
  """Compiles every (config, topology), searches the largest batch, writes a markdown table
  between the scale-table markers of `path`. Results are cached in `cache_path` (.jsonl, one
  row per entry and topology) so an interrupted run resumes and a second file (README.md,
  docs/scale.md) is rendered from the same rows without compiling again."""
  import jax
  from d2v_jax import config as config_lib
  done = {}
  if os.path.exists(cache_path):
    for line in open(cache_path):
      row = json.loads(line)
      done[(row["entry"], row["topology"])] = row
  for entry in entries:
    # modality:variant[:key=value,key=value] -- extra overrides for this entry only
    modality, variant, *extra = entry.split(":", 2)
    for tname in topologies:
      if (entry, tname) in done:
        continue
      cfg = config_lib.load_file(f"configs/{modality}.py:variant={variant}")
      for item in list(overrides) + (extra[0].split(",") if extra else []):
        config_lib.apply_override(cfg, item)
      topo = parse_topology(tname)
      devices, backend = target_devices(topo, force_cpu)
      print(f"{entry} on {topo.describe()} [{backend}]", flush=True)
      t0 = time.time()
      try:
        lo, hi, seen = search_batch(cfg, topo, devices, backend, start, max_trials,
                                    log=lambda s: print(s, flush=True))
        error = ""
      except Exception as e:  # noqa: BLE001 - one broken entry must not lose the others
        lo, hi, seen, error = 0, None, {}, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        print(f"  failed: {error}", flush=True)
      best = seen.get(lo)
      row = {"entry": entry, "topology": tname, "backend": backend, "overrides": list(overrides),
             "largest_batch": lo, "first_failing": hi, "search_s": time.time() - t0,
             "error": error, "report": dataclasses.asdict(best) if best else None}
      done[(entry, tname)] = row
      with open(cache_path, "a") as f:
        f.write(json.dumps(row) + "\n")
      jax.clear_caches()
  write_markdown(path, [done[k] for k in sorted(done, key=lambda k: (
      entries.index(k[0]) if k[0] in entries else 99, k[1]))])


TABLE_BEGIN, TABLE_END = "<!-- scale-table:begin -->", "<!-- scale-table:end -->"


def bound_of(report: dict, topology: str) -> tuple[float, float, str]:
  """(roofline bound s, compute floor s, what bounds it) of a cached report dict. Rows cached
  before the bound was stored (est_step_s = the same max(compute, HBM) roofline) are
  converted: the compute floor is recomputed from the compiled FLOPs and the chip's peak."""
  if report.get("bound_s"):
    return report["bound_s"], report["compute_bound_s"], report["bound_by"]
  chip = parse_topology(topology).chip
  compute = report["flops_per_device"] / (chip.peak_tflops * 1e12)
  bound = report.get("est_step_s") or 0.0
  return bound, compute, ("HBM bytes" if bound > compute * (1 + 1e-6) else "compute")


def render_table(rows: list[dict]) -> str:
  lines = ["| config | topology | mesh (data x fsdp x tensor) | remat | largest batch / device | "
           "memory / device at it | FLOPs / step / device, compiled (analytic) | "
           "roofline bound / step | bound by |",
           "|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    r = row["report"]
    extra = row["entry"].split(":", 2)[2].split(",") if row["entry"].count(":") >= 2 else []
    remat = next((o.split("=", 1)[1] for o in list(row.get("overrides", ())) + extra
                  if o.startswith("model.encoder.remat=")), None) or (r or {}).get("remat") or "none"
    if r is None:
      why = row.get("error") or "none fits"
      lines.append(f"| {row['entry']} | {row['topology']} | - | {remat} | {why} | - | - | - | - |")
      continue
    edge = (f"{row['largest_batch']} ({row['first_failing']} does not fit)" if row["first_failing"]
            else f">= {row['largest_batch']} (search stopped)")
    mesh = "x".join(str(v) for v in r["mesh"].values())
    bound, _, by = bound_of(r, row["topology"])
    analytic = r["model_flops"] / r["num_devices"] / 1e12 if r.get("model_flops") else None
    flops = f"{r['flops_per_device'] / 1e12:.1f} T" + (f" ({analytic:.1f} T)" if analytic else "")
    lines.append(
        f"| {row['entry']} | {row['topology']} | {mesh} | {remat} | {edge} | "
        f"{r['memory']['total'] / GiB:.1f} of {r['hbm_bytes'] / GiB:.2f} GiB | "
        f"{flops} | >= {1e3 * bound:.0f} ms | {by} |")
  return "\n".join(lines) + "\n"


def write_markdown(path: str, rows: list[dict]) -> None:
  """Puts the table between the scale-table markers of `path` (the prose around it stays);
  a file without markers is created holding just the table."""
  table_md = f"{TABLE_BEGIN}\n{render_table(rows)}{TABLE_END}"
  text = open(path).read() if os.path.exists(path) else ""
  if TABLE_BEGIN in text and TABLE_END in text:
    head, rest = text.split(TABLE_BEGIN, 1)
    text = head + table_md + rest.split(TABLE_END, 1)[1]
  else:
    text = table_md + "\n"
  with open(path, "w") as f:
    f.write(text)


# ------------------------------------------------------------------------------------ CLI


def _flags(argv: list[str]):
  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()
  # sys_argv: config_flags finds `--config.x=y` overrides in the argv it is given (default
  # sys.argv), so in-process calls main(argv) see their own overrides.
  config_flags.DEFINE_config_file("config", None, "config file[:args]", flag_values=fv,
                                  sys_argv=argv)
  flags.DEFINE_string("topology", "v5e-8", "TPU topology: v5e-8, v4-8, v5p-8, v6e-8, v5e:2x4, ...",
                      flag_values=fv)
  flags.DEFINE_integer("num_slices", 1, "slices joined over DCN (multislice)", flag_values=fv)
  flags.DEFINE_integer("batch_per_device", None, "examples per batch shard (sets batch_size)",
                       flag_values=fv)
  flags.DEFINE_bool("search_batch", False, "search the largest per-device batch that fits",
                    flag_values=fv)
  flags.DEFINE_string("remat", "", "remat policies to compare: all, or a comma list of "
                      "none,full,minimal,save_dots,save_qkv_out,offload (with --search_batch: "
                      "the largest batch per policy)", flag_values=fv)
  flags.DEFINE_integer("max_trials", 6, "--search_batch: compiles per search (per remat policy)",
                       flag_values=fv)
  flags.DEFINE_bool("fallback", False, "compile for fake CPU devices even if libtpu exists",
                    flag_values=fv)
  flags.DEFINE_string("json", None, "also write the report as JSON here", flag_values=fv)
  flags.DEFINE_string("table", None, "regenerate the scale table (markdown) at this path",
                      flag_values=fv)
  flags.DEFINE_string("cache", TABLE_CACHE, "table: JSON-lines cache of compiled rows",
                      flag_values=fv)
  flags.DEFINE_multi_string("entries", list(TABLE_ENTRIES),
                            "table: modality:variant[:key=value,...] (repeat the flag)",
                            flag_values=fv)
  flags.DEFINE_list("topologies", list(TABLE_TOPOLOGIES), "table: topologies", flag_values=fv)
  return fv


def _ensure_cpu_devices(argv: list[str]) -> None:
  """Without libtpu the fallback needs N fake CPU devices, set before jax starts."""
  if tpu_compiler_available() and "--fallback" not in argv:
    return
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return
  topo, slices = "v5e-8", 1
  for i, a in enumerate(argv):
    if a.startswith("--topology"):
      topo = a.split("=", 1)[1] if "=" in a else argv[i + 1]
    if a.startswith("--num_slices"):
      slices = int(a.split("=", 1)[1] if "=" in a else argv[i + 1])
  try:
    n = parse_topology(topo, slices).num_devices
  except ValueError:
    return
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={max(n, 8)}").strip()


def _main_remat(cfg, topo, devices, backend, policies, fv) -> int:
  """--remat: one search (or one compile at the given batch) per policy, then a table."""
  if fv.search_batch:
    rows = search_remat(cfg, topo, devices, backend, policies, fv.batch_per_device or 8,
                        fv.max_trials, log=lambda s: print(s, flush=True))
  else:
    rows = []
    for policy in policies:
      c = cfg.copy_and_resolve_references()
      c.model.encoder.remat = policy
      r = compile_step(c, topo, devices=devices, backend=backend)
      print(f"remat={policy}: " + (f"{r.memory['total'] / GiB:.2f} GiB" if r.memory else "compiler OOM")
            + (" fits" if r.fits else " does not fit") + f" ({r.compile_s:.0f} s)", flush=True)
      rows.append({"remat": policy, "report": r})
  best = max((row for row in rows if row["report"] is not None and row["report"].fits),
             key=lambda row: (row.get("largest_batch", 0), -row["report"].bound_s), default=None)
  if best is not None:
    print("\n".join(best["report"].lines()))
  print(f"\n{topo.chip.name} ({topo.chip.hbm_gib:g} GiB HBM per device), per remat policy:")
  print(remat_table(rows), flush=True)
  if fv.json:
    with open(fv.json, "w") as f:
      json.dump([{**row, "report": dataclasses.asdict(row["report"]) if row["report"] else None}
                 for row in rows], f, indent=2)
  return EXIT_OK if best is not None else EXIT_NO_FIT


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  _ensure_cpu_devices(argv)
  from d2v_jax import config as config_lib
  fv = _flags(argv)
  if any(a.startswith("--table") for a in argv):
    fv(argv)
    if fv.config is not None:
      print("error: --table builds its own configs (--entries); drop --config", file=sys.stderr)
      return EXIT_BAD_INPUT
    table(fv.table, entries=tuple(fv.entries), topologies=tuple(fv.topologies),
          force_cpu=fv.fallback, cache_path=fv.cache)
    print(f"wrote {fv.table}")
    return EXIT_OK
  try:
    fv = config_lib.parse_argv(argv, fv)
    topo = parse_topology(fv.topology, fv.num_slices)
  except (config_lib.ConfigError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  cfg = fv.config
  try:
    if fv.batch_per_device:
      with_batch_per_device(cfg, fv.batch_per_device, topo)
    devices, backend = target_devices(topo, fv.fallback)
    if backend != "tpu":
      print(f"note: TPU compilation not available ({backend.split(': ', 1)[-1]}); compiling for "
            f"{len(devices)} fake CPU devices instead: memory and FLOPs are the CPU program's, "
            f"limits are {topo.chip.name}'s", flush=True)
    if fv.remat:
      return _main_remat(cfg, topo, devices, backend, remat_names(fv.remat), fv)
    if fv.search_batch:
      start = fv.batch_per_device or 8
      lo, hi, seen = search_batch(cfg, topo, devices, backend, start, fv.max_trials)
      print(f"largest batch per device that fits {topo.chip.name} HBM: {lo}"
            + (f" ({hi} does not)" if hi else " (search stopped before a failure)"))
      if not lo:
        return EXIT_NO_FIT
      report = seen[lo]
    else:
      report = compile_step(cfg, topo, devices=devices, backend=backend)
  except (config_lib.ConfigError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  print("\n".join(report.lines()), flush=True)
  if fv.json:
    with open(fv.json, "w") as f:
      json.dump(dataclasses.asdict(report), f, indent=2)
  if not report.fits:
    used = (f"needs {report.memory['total'] / GiB:.2f} GiB per device" if report.memory
            else f"was refused by the compiler ({report.error})")
    print(f"error: the step does not fit {topo.chip.name} HBM ({topo.chip.hbm_gib:g} GiB per "
          f"device): it {used}. Lower the batch (--batch_per_device), shard more "
          f"(--config.mesh.preset=fsdp), use --config.dtype=bfloat16 or "
          f"--config.model.encoder.remat=full (compare policies: --search_batch --remat all)",
          file=sys.stderr)
    return EXIT_NO_FIT
  return EXIT_OK


if __name__ == "__main__":
  sys.exit(main())
