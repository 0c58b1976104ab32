"""The largest per-device batch a config fits in a topology's HBM, per remat policy: compile
at a start batch, jump to what a linear memory model (fixed state + per-example temporaries)
predicts, then bisect; every probe is a real ahead-of-time compile (d2v_jax/aot.py)."""

from __future__ import annotations

from d2v_jax import sharding
from d2v_jax.aot import compile_step
from d2v_jax.models import transformer
from d2v_jax.topology import GiB, Topology


def with_batch_per_device(cfg, per_device: int, topo: Topology) -> None:
  """Sets the global batch so each batch shard (data x fsdp) holds `per_device` examples."""
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


def remat_names(arg: str) -> list[str]:
  """--remat value -> canonical policy names ("all" = every policy; "dots" = save_dots)."""
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
