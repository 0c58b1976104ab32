"""The scale table (docs/scale.md): for each (config, topology), the largest batch per
device that fits, its memory, FLOPs and roofline bound, from real ahead-of-time compiles
(`python -m d2v_jax.compile --table docs/scale.md`). Rows are cached in docs/scale.jsonl, so
an interrupted run resumes and the table re-renders without compiling again."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax

from d2v_jax import config as config_lib
from d2v_jax.batch_search import search_batch
from d2v_jax.topology import GiB, parse_topology, target_devices

TABLE_ENTRIES = ("text:base", "text:large", "vision:base", "vision:large", "audio:base",
                 "audio:large")
TABLE_TOPOLOGIES = ("v5e-8", "v5p-8")
TABLE_OVERRIDES = ("dtype=bfloat16", "mesh.preset=fsdp")
TABLE_CACHE = "docs/scale.jsonl"
TABLE_BEGIN, TABLE_END = "<!-- scale-table:begin -->", "<!-- scale-table:end -->"


def table(path: str, entries=TABLE_ENTRIES, topologies=TABLE_TOPOLOGIES,
          overrides=TABLE_OVERRIDES, start: int = 8, max_trials: int = 5, force_cpu=False,
          cache_path: str = TABLE_CACHE) -> None:
  """Compiles every (config, topology), searches the largest batch, writes a markdown table
  between the scale-table markers of `path`. Results are cached in `cache_path` (.jsonl, one
  row per entry and topology) so an interrupted run resumes and another file is rendered
  from the same rows without compiling again."""
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
