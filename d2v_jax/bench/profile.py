"""Where a compiled step spends its time: XLA thunk traces grouped by phase and kind.

  python -m d2v_jax.bench profile --modality text --size small [--steps 3]

Needs XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true (the dispatcher sets it for this
benchmark before jax starts): every executed thunk (fusion, dot, copy, ...) is then a trace
event named after its HLO instruction. Each instruction is classified from its metadata
op_name (the Flax module path and the jax.named_scope phases of d2v_jax/step.py) into
  phase: teacher | student fwd | student bwd | optimizer | ema | metrics | other
  kind:  matmul | attention | layernorm | gelu | dropout-rng | loss/targets | data movement |
         conv | elementwise
Event durations are wall times on each thread; on a shared machine they include time the
thread was descheduled, so read the shares, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import tempfile

import jax
from jax._src.lib import _profile_data

from d2v_jax import bench
from d2v_jax.bench import setups

_OPNAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--modality", default="text")
  p.add_argument("--size", default="small")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--dtype", default="float32")
  setups.add_set_arg(p)
  p.add_argument("--quick", action="store_true", help="tiny size, 1 step")
  p.add_argument("--out", default="bench_results/profile.json")


def instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
  """HLO instruction name -> (opcode, op_name metadata) for every instruction of the module;
  a fusion without op_name takes the first op_name found inside its fused computation."""
  comps: dict[str, list[str]] = {}
  current = None
  out: dict[str, tuple[str, str]] = {}
  calls: dict[str, str] = {}
  for line in hlo_text.splitlines():
    if line and not line.startswith(" ") and "{" in line and "=" not in line.split("{")[0]:
      current = line.split()[0].lstrip("%")
      if current == "ENTRY":
        current = line.split()[1].lstrip("%")
      comps[current] = []
      continue
    m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = \S+(?:\{[^}]*\})?\s+([\w\-]+)\(", line) or \
        re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?\s([\w\-]+)\(", line)
    if not m:
      continue
    name, opcode = m.group(1), m.group(2)
    op = _OPNAME.search(line)
    out[name] = (opcode, op.group(1) if op else "")
    c = _CALLS.search(line)
    if c:
      calls[name] = c.group(1)
    if current is not None:
      comps[current].append(line)
  for name, comp in calls.items():
    opcode, op = out[name]
    body = "\n".join(comps.get(comp, []))
    if not op:
      inner = _OPNAME.findall(body)
      op = inner[-1] if inner else ""
    if "dot(" in body or "convolution(" in body:
      opcode = "dot" if "dot(" in body else "convolution"
    out[name] = (opcode, op)
  return out


def phase(op_name: str) -> str:
  for scope in ("teacher", "optimizer", "ema", "metrics"):
    if f"/{scope}/" in f"/{op_name}/" or op_name.startswith(scope + "/"):
      return scope
  if "transpose(jvp(" in op_name:
    return "student bwd"
  if "jvp(" in op_name or "student" in op_name:
    return "student fwd"
  return "other"


def kind(opcode: str, op_name: str, name: str) -> str:
  n = op_name.lower()
  if "threefry" in n or "_bernoulli" in n or "random_bits" in n or "_uniform" in n:
    return "dropout-rng"
  if opcode == "convolution" or "conv" in n.split("/")[-2:-1] or "/conv" in n:
    return "conv"
  if opcode in ("dot", "custom-call") or name.startswith(("ynn_fusion", "xnn_fusion", "dot")):
    if "attention" in n and ("bqhd" in n or "bhqk" in n or "einsum" in n):
      return "attention matmul"
    return "matmul"
  if "attention" in n and any(k in n for k in ("exp", "reduce_max", "softmax", "div", "sub")):
    return "attention softmax"
  if "norm" in n:
    return "layernorm"
  if "erf" in n or "gelu" in n:
    return "gelu"
  if "dropout" in n:
    return "dropout-rng"
  if opcode in ("copy", "transpose", "dynamic-update-slice", "dynamic-slice", "broadcast",
                "concatenate", "gather", "scatter", "slice", "pad") or \
      any(k in name for k in ("copy", "transpose", "dynamic-update-slice", "dynamic-slice",
                              "broadcast", "concatenate", "gather", "scatter")):
    return "data movement"
  return "elementwise"


def trace_events(trace_dir: str):
  files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not files:
    raise RuntimeError(f"no trace written under {trace_dir}")
  pd = _profile_data.ProfileData.from_file(files[0])
  for plane in pd.planes:
    for line in plane.lines:
      for ev in line.events:
        yield line.name, ev.name, ev.duration_ns


def profile_step(step, state, batch, steps: int, hlo_text: str):
  """Runs `steps` steps under the profiler; returns (rows by phase/kind, top instructions)."""
  instr = instructions(hlo_text)
  d = tempfile.mkdtemp(prefix="d2v_prof_")
  try:
    jax.profiler.start_trace(d)
    for _ in range(steps):
      state, m = step(state, batch)
      jax.block_until_ready((state, m))
    jax.profiler.stop_trace()
    by_cat: collections.Counter = collections.Counter()
    by_name: collections.Counter = collections.Counter()
    for line, name, ns in trace_events(d):
      if name not in instr:
        continue   # executor / python / wait events
      opcode, op_name = instr[name]
      by_cat[(phase(op_name), kind(opcode, op_name, name))] += ns
      by_name[(name, phase(op_name), kind(opcode, op_name, name), op_name)] += ns
  finally:
    shutil.rmtree(d, ignore_errors=True)
  total = sum(by_cat.values()) or 1
  rows = [{"phase": p, "kind": k, "ms/step": ns / steps / 1e6, "share %": 100 * ns / total}
          for (p, k), ns in by_cat.most_common()]
  top = [{"instruction": n, "phase": p, "kind": k, "op_name": o[-80:], "ms/step": ns / steps / 1e6,
          "share %": 100 * ns / total} for (n, p, k, o), ns in by_name.most_common(400)]
  return state, rows, top, total / steps / 1e6


def main(args: argparse.Namespace) -> int:
  size = "tiny" if args.quick else args.size
  steps = 1 if args.quick else args.steps
  setup = setups.make(args.modality, size, dtype=args.dtype,
                      overrides=setups.parse_sets(args.set))
  built, state, gbatch = setup.built, setup.state, setup.global_batch
  for _ in range(2):
    state, m = built.step(state, gbatch)
    jax.block_until_ready((state, m))
  hlo = built.step.lower(state, gbatch).compile().as_text()
  state, rows, top, ms = profile_step(built.step, state, gbatch, steps, hlo)
  print(f"thunk time (all threads): {ms:.1f} ms/step")
  phases: collections.Counter = collections.Counter()
  kinds: collections.Counter = collections.Counter()
  for r in rows:
    phases[r["phase"]] += r["share %"]
    kinds[r["kind"]] += r["share %"]
  summary = [{"group": f"phase: {k}", "share %": v} for k, v in phases.most_common()] + \
            [{"group": f"kind: {k}", "share %": v} for k, v in kinds.most_common()]
  bench.report("profile", summary, ["group", "share %"], args.out, modality=args.modality,
               size=size, dtype=args.dtype, steps=steps, thunk_ms_per_step=ms, detail=rows,
               top=top)
  print()
  print(bench.markdown_table(top[:20], ["instruction", "phase", "kind", "op_name", "ms/step",
                                        "share %"]))
  return 0
