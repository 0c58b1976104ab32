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

from d2v_jax import config as config_lib, scaling, sharding
from d2v_jax.aot import compile_step
from d2v_jax.batch_search import search_batch, with_batch_per_device
from d2v_jax.topology import GiB, parse_topology, target_devices

TABLE_ENTRIES = ("text:base", "text:large", "vision:base", "vision:large", "audio:base",
                 "audio:large")
TABLE_TOPOLOGIES = ("v5e-8", "v5p-8")
TABLE_OVERRIDES = ("dtype=bfloat16", "mesh.preset=fsdp")
TABLE_CACHE = "docs/scale.jsonl"
TABLE_BEGIN, TABLE_END = "<!-- scale-table:begin -->", "<!-- scale-table:end -->"
# The `fit=` choices (d2v_jax/fits.py): every base / large recipe, v1 and v2.
FIT_ENTRIES = tuple(f"{m}:{v}{o}" for m in ("text", "vision", "audio") for v in ("base", "large")
                    for o in ("", ",v2"))
FIT_OVERRIDES = ("mesh.preset=fsdp",)
FIT_REMATS = ("none", "full")   # no recompute, else all (minimal: 10+ min per libtpu compile of v2)
FIT_BEGIN, FIT_END = "<!-- fit-table:begin -->", "<!-- fit-table:end -->"


def _cached(cache_path: str, kind: str) -> dict:
  done = {}
  if os.path.exists(cache_path):
    for line in open(cache_path):
      row = json.loads(line)
      if row.get("kind", "largest") == kind:
        done[(row["entry"], row["topology"])] = row
  return done


def _entry_config(entry: str, overrides):
  """modality:variant[,v2][:key=value,...] -> the recipe's config with the overrides."""
  modality, variant, *extra = entry.split(":", 2)
  cfg = config_lib.load_file(f"configs/{modality}.py:variant={variant}")
  for item in list(overrides) + (extra[0].split(",") if extra else []):
    config_lib.apply_override(cfg, item)
  return cfg


def fit_search(cfg, topo, devices, backend, max_trials: int = 4, log=print) -> dict:
  """The `fit=` choice for one recipe on one slice: the recipe's own global batch with the
  first of FIT_REMATS that fits; if none does, the largest batch per device under full remat
  (the scaling rule then adapts the recipe to it). Returns remat, per_device,
  recipe_per_device, first_failing and the Report dict of the chosen compile."""
  shape = sharding.mesh_shape(cfg.mesh, topo.num_devices, topo.num_slices)
  recipe_per_device = max(1, cfg.batch_size // (shape[0] * shape[1]))
  c = cfg
  for remat in FIT_REMATS:
    c = cfg.copy_and_resolve_references()
    c.model.encoder.remat = remat
    with_batch_per_device(c, recipe_per_device, topo)
    r = compile_step(c, topo, devices=devices, backend=backend)
    log(f"  remat={remat} at the recipe's {recipe_per_device}/device: "
        + (f"{r.memory['total'] / GiB:.2f} GiB" if r.memory else "compiler OOM")
        + (" fits" if r.fits else " does not fit") + f" ({r.compile_s:.0f} s)")
    if r.fits:
      return {"remat": remat, "per_device": recipe_per_device, "first_failing": None,
              "recipe_per_device": recipe_per_device, "report": dataclasses.asdict(r)}
  lo, hi, seen = search_batch(c, topo, devices, backend, max(1, recipe_per_device // 2),
                              max_trials, log=log)
  return {"remat": "full", "per_device": lo, "first_failing": hi or recipe_per_device,
          "recipe_per_device": recipe_per_device,
          "report": dataclasses.asdict(seen[lo]) if lo else None}


def _compile_rows(entries, topologies, kind: str, overrides, cache_path: str, force_cpu: bool,
                  search, failed: dict) -> list[dict]:
  """The loop both tables share: for every (entry, topology) not yet in `cache_path` (rows of
  this `kind`), the entry's config with `overrides`, `search(cfg, topo, devices, backend,
  log)` -> the row's own fields (`failed` when it raises: one broken entry must not lose the
  others), one row appended to the cache. Returns every row of this kind in entry order."""
  done = _cached(cache_path, kind)
  for entry in entries:
    # modality:variant[:key=value,key=value] -- extra overrides for this entry only
    for tname in topologies:
      if (entry, tname) in done:
        continue
      cfg = _entry_config(entry, overrides)
      topo = parse_topology(tname)
      devices, backend = target_devices(topo, force_cpu)
      print(f"{entry} on {topo.describe()} [{backend}]", flush=True)
      t0 = time.time()
      try:
        fields = search(cfg, topo, devices, backend, lambda s: print(s, flush=True))
        error = ""
      except Exception as e:  # noqa: BLE001 - one broken entry must not lose the others
        fields, error = dict(failed), f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        print(f"  failed: {error}", flush=True)
      row = {**({"kind": kind} if kind != "largest" else {}), "entry": entry, "topology": tname,
             "backend": backend, "overrides": list(overrides), "search_s": time.time() - t0,
             "error": error, "recipe_batch": int(cfg.batch_size), **fields}
      done[(entry, tname)] = row
      with open(cache_path, "a") as f:
        f.write(json.dumps(row) + "\n")
      jax.clear_caches()
  return [done[k] for k in sorted(done, key=lambda k: (
      entries.index(k[0]) if k[0] in entries else 99, k[1]))]


def fit_table(path: str, entries=FIT_ENTRIES, topologies=TABLE_TOPOLOGIES, force_cpu=False,
              cache_path: str = TABLE_CACHE, max_trials: int = 4) -> None:
  """fit_search for every (recipe, slice), cached as kind="fit" rows of `cache_path`, then the
  table between the fit-table markers of `path` and the FITS lines for d2v_jax/fits.py."""
  rows = _compile_rows(
      entries, topologies, "fit", FIT_OVERRIDES, cache_path, force_cpu,
      lambda cfg, topo, devices, backend, log: fit_search(cfg, topo, devices, backend,
                                                         max_trials, log=log),
      failed={"report": None})
  _between_markers(path, FIT_BEGIN, FIT_END, render_fit_table(rows))
  print("FITS for d2v_jax/fits.py:\n" + fits_lines(rows))


def fits_lines(rows: list[dict]) -> str:
  out = []
  for row in rows:
    if row.get("report"):
      modality, variant = row["entry"].split(":", 1)
      v2 = variant.endswith(",v2")
      out.append(f'    ("{modality}", "{variant.removesuffix(",v2")}", "{"v2" if v2 else "v1"}", '
                 f'"{row["topology"]}"): ("{row["remat"]}", {row["per_device"]}),')
  return "\n".join(out)


def render_fit_table(rows: list[dict]) -> str:
  lines = ["| recipe | slice | `fit=` choice: mesh, remat, batch / device (global) | recipe's "
           "global batch | memory / device | roofline bound / step | what the scaling rule "
           "makes of the recipe at this batch |",
           "|---|---|---|---|---|---|---|"]
  for row in rows:
    r = row["report"]
    if r is None:
      why = row.get("error") or "nothing fits, even 1 per device under full remat"
      lines.append(f"| {row['entry']} | {row['topology']} | {why} | {row.get('recipe_batch', '-')} "
                   "| - | - | - |")
      continue
    cfg = _entry_config(row["entry"], row.get("overrides", FIT_OVERRIDES))
    batch = r["global_batch"]
    if batch == cfg.batch_size:
      rule = "the recipe as it is"
    else:
      v = scaling.scaled(cfg, batch)
      rule = (f"k = {batch / cfg.batch_size:.3g}: lr {cfg.optim.lr:.3g} -> {v['optim.lr']:.3g}, "
              f"tau {cfg.teacher.tau_start:g} -> {v['teacher.tau_start']:.6g} (start), "
              f"{cfg.teacher.tau_end:g} -> {v['teacher.tau_end']:.6g} (end), "
              f"steps {cfg.total_steps} -> {v['total_steps']}")
    edge = f", {row['first_failing']}/device does not" if row.get("first_failing") else ""
    mesh = "x".join(str(x) for x in r["mesh"].values())
    bound, _, by = bound_of(r, row["topology"])
    lines.append(
        f"| {row['entry']} | {row['topology']} | {mesh}, {row['remat']}, {row['per_device']} "
        f"({batch}){edge} | {cfg.batch_size} | {r['memory']['total'] / GiB:.1f} of "
        f"{r['hbm_bytes'] / GiB:.2f} GiB | >= {1e3 * bound:.0f} ms ({by}) | {rule} |")
  return "\n".join(lines) + "\n"


def table(path: str, entries=TABLE_ENTRIES, topologies=TABLE_TOPOLOGIES,
          overrides=TABLE_OVERRIDES, start: int = 8, max_trials: int = 5, force_cpu=False,
          cache_path: str = TABLE_CACHE) -> None:
  """Compiles every (config, topology), searches the largest batch, writes a markdown table
  between the scale-table markers of `path`. Results are cached in `cache_path` (.jsonl, one
  row per entry and topology) so an interrupted run resumes and another file is rendered
  from the same rows without compiling again."""
  def search(cfg, topo, devices, backend, log) -> dict:
    lo, hi, seen = search_batch(cfg, topo, devices, backend, start, max_trials, log=log)
    best = seen.get(lo)
    return {"largest_batch": lo, "first_failing": hi,
            "report": dataclasses.asdict(best) if best else None}

  write_markdown(path, _compile_rows(
      entries, topologies, "largest", overrides, cache_path, force_cpu, search,
      failed={"largest_batch": 0, "first_failing": None, "report": None}))


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
  _between_markers(path, TABLE_BEGIN, TABLE_END, render_table(rows))


def _between_markers(path: str, begin: str, end: str, table_md: str) -> None:
  table_md = f"{begin}\n{table_md}{end}"
  text = open(path).read() if os.path.exists(path) else ""
  if begin in text and end in text:
    head, rest = text.split(begin, 1)
    text = head + table_md + rest.split(end, 1)[1]
  else:
    text = (text + "\n" if text else "") + table_md + "\n"
  with open(path, "w") as f:
    f.write(text)
