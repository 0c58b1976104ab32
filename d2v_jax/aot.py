"""The trainer's own train step, compiled ahead of time for a TPU topology on a machine
without one (libtpu's compile-only devices, or fake CPU devices without libtpu): compiler-exact
memory per device, FLOPs per step (compiled, and the analytic model of d2v_jax/flops.py) and a
roofline lower bound on the step time. `python -m d2v_jax.compile` (d2v_jax/compile.py) is the
command line; d2v_jax/batch_search.py finds the largest batch that fits.

FLOPs: XLA's cost analysis counts the body of a loop (nn.scan over layers) once. The figure
reported adds the missing iterations' matmul FLOPs, counted on the traced step (whose scan
lengths are known); HBM bytes are scaled by the same factor. Remat recomputation shows in the
compiled FLOPs, not in the analytic ones.
"""

from __future__ import annotations

import dataclasses
import time

import flax.linen as nn
import jax

from d2v_jax import build as build_lib, flops, resolve, sharding
from d2v_jax.models import attention, transformer
from d2v_jax.topology import GiB, Topology, roofline


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
  attention: str = ""               # attention.describe_attention for the target platform
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


def _oom_message(err: Exception) -> str | None:
  text = str(err)
  if "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "out of memory" in text.lower():
    line = next((ln for ln in text.splitlines() if "memory" in ln.lower()), text.splitlines()[0])
    return line.strip()[:300]
  return None


def compile_step(cfg, topo: Topology, *, devices=None, backend: str = "tpu") -> Report:
  """Builds the trainer's step for `devices` (the topology's), compiles it, and reports."""
  # The data's keys without reading data (a text vocabulary: the size its tokenizer would be
  # trained to); what the model chooses per platform follows the topology's devices (build.py).
  mod = resolve.resolve(cfg)
  t0 = time.time()
  built = build_lib.build(cfg, devices=devices, mod=mod)
  mesh = built.mesh
  sharding.check_batch(cfg.batch_size, mesh)
  state = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                 built.abstract_state, built.state_shardings)
  batch = build_lib.abstract_batch(cfg, built.modality, built.batch_shardings)
  sizes, repl = sharding.report(built.state_shardings, built.abstract_state)

  # Traced matmul FLOPs (global): with scan bodies scaled by their length, and once.
  with nn.logical_axis_rules(sharding.RULES), jax.set_mesh(mesh):
    jaxpr = jax.make_jaxpr(built.step_fn)(built.abstract_state, batch).jaxpr
  traced, traced_once = flops.matmul_flops(jaxpr, True), flops.matmul_flops(jaxpr, False)

  model, seq_len = flops.model_flops(built, batch)

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
  spec = built.model.spec
  return Report(
      topology=topo.describe(), backend=backend, num_devices=n, mesh=dict(mesh.shape),
      preset=str(cfg.mesh.preset or ""), dtype=cfg.dtype, global_batch=cfg.batch_size,
      batch_per_device=cfg.batch_size // sharding.batch_shards(mesh), seq_len=seq_len, fits=fits,
      hbm_bytes=hbm, memory=mem, state_bytes=sizes, replicated_params=len(repl),
      xla_flops_raw=xla_raw, flops_per_device=flops_dev, model_flops=model["total"],
      model_flops_parts=model, traced_matmul_flops=traced, bytes_per_device=bytes_dev,
      compute_bound_s=compute_s, hbm_bound_s=hbm_s, bound_s=bound_s, bound_by=bound_by,
      compile_s=time.time() - t0, remat=transformer.remat_policy(spec.remat)[0],
      attention=attention.describe_attention(spec, attention.attention_platform(spec)),
      peak_tflops=topo.chip.peak_tflops, hbm_gbps=topo.chip.hbm_gbps, error=err)
