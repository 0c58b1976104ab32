"""Ahead-of-time compile of the real train step for a TPU topology, on a machine without one.

  python -m d2v_jax.compile --config configs/text.py:variant=base --topology v5e-8
  python -m d2v_jax.compile --config configs/text.py:variant=large --topology v5p-8 \
      --config.mesh.preset=fsdp --config.dtype=bfloat16 --batch_per_device=16
  python -m d2v_jax.compile --config configs/vision.py:variant=base --topology v5e-16 --num_slices=2
  python -m d2v_jax.compile --config configs/text.py:variant=base --topology v6e-8 --search_batch
  python -m d2v_jax.compile --table docs/scale.md   # regenerates the scale table (slow)
  python -m d2v_jax.compile --table docs/scale.md --fits   # the fit= choices (d2v_jax/fits.py)

The step is the trainer's own (d2v_jax/aot.py: memory, compiled and analytic FLOPs, a
roofline lower bound on the step time, not a measurement; MFU is a measured step time's
figure: python -m d2v_jax.bench gpu / mfu). Topologies: d2v_jax/topology.py.

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
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from d2v_jax import console  # noqa: F401,E402  (first: quiet console, d2v_jax/console.py)

from d2v_jax import cli, config as config_lib, fits, scale_table, scaling  # noqa: E402
from d2v_jax.aot import compile_step  # noqa: E402
from d2v_jax.batch_search import (remat_names, remat_table, search_batch, search_remat,  # noqa: E402
                                  with_batch_per_device)
from d2v_jax.topology import GiB, parse_topology, target_devices, tpu_compiler_available  # noqa: E402

EXIT_OK, EXIT_BAD_INPUT, EXIT_NO_FIT = 0, 2, 3


def _parser() -> cli.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m d2v_jax.compile", description=__doc__.splitlines()[0])
  p.add_argument("--config", default=None, help="config file[:args] (and --config.KEY=VALUE)")
  p.add_argument("--topology", default="v5e-8",
                 help="TPU topology: v5e-8, v4-8, v5p-8, v6e-8, v5e:2x4, ...")
  p.add_argument("--num_slices", type=int, default=1, help="slices joined over DCN (multislice)")
  p.add_argument("--batch_per_device", type=int, default=None,
                 help="examples per batch shard (sets batch_size)")
  p.add_argument("--search_batch", action="store_true",
                 help="search the largest per-device batch that fits")
  p.add_argument("--remat", default="", help="remat policies to compare: all, or a comma list of "
                 "none,full,minimal,save_dots,save_qkv_out,offload (with --search_batch: the "
                 "largest batch per policy)")
  p.add_argument("--max_trials", type=int, default=6,
                 help="--search_batch: compiles per search (per remat policy)")
  p.add_argument("--fallback", action="store_true",
                 help="compile for fake CPU devices even if libtpu exists")
  p.add_argument("--json", default=None, help="also write the report as JSON here")
  p.add_argument("--table", default=None, help="regenerate the scale table (markdown) at this path")
  p.add_argument("--fits", action="store_true",
                 help="table: the fit= choice of each recipe and slice (d2v_jax/fits.py) instead "
                 "of the largest batch")
  p.add_argument("--cache", default=scale_table.TABLE_CACHE,
                 help="table: JSON-lines cache of compiled rows")
  p.add_argument("--entries", action="append", default=None,
                 help="table: modality:variant[:key=value,...] (repeat the flag)")
  p.add_argument("--topologies", default=",".join(scale_table.TABLE_TOPOLOGIES),
                 help="table: comma-separated topologies")
  return p


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
    print(scaling.at_batch(cfg, best["report"].global_batch), flush=True)
  print(f"\n{topo.chip.name} ({topo.chip.hbm_gib:g} GiB HBM per device), per remat policy:")
  print(remat_table(rows), flush=True)
  if fv.json:
    with open(fv.json, "w") as f:
      json.dump([{**row, "report": dataclasses.asdict(row["report"]) if row["report"] else None}
                 for row in rows], f, indent=2)
  return EXIT_OK if best is not None else EXIT_NO_FIT


def oom_advice(cfg, topo=None) -> str:
  """What to try next, in the order that costs the least: the measured `fit=` choice for this
  slice when one exists (d2v_jax/fits.py), then only what the config has not already set
  (bfloat16, full remat, FSDP), then a smaller batch with the scaling rule."""
  steps = []
  if topo is not None and any(k[0] == cfg.modality and k[2] == cfg.objective and k[3] == topo.name
                              for k in fits.FITS):
    steps.append(f"the measured choice for this slice: add fit={topo.name} to the config "
                 f"arguments (configs/{cfg.modality}.py:variant=...,fit={topo.name}; docs/scale.md "
                 "\"Recipes that fit\")")
  if cfg.dtype != "bfloat16":
    steps.append("--config.dtype=bfloat16")
  if cfg.model.encoder.remat != "full":
    steps.append("--config.model.encoder.remat=full (compare policies: --search_batch --remat all)")
  if cfg.mesh.preset not in ("fsdp", "fsdp_tp") and cfg.mesh.fsdp == 1:
    steps.append("--config.mesh.preset=fsdp (parameters, teacher and optimizer state sharded)")
  nxt = (f"Try {steps[0]}" + (f"; then {'; '.join(steps[1:])}" if steps[1:] else "")) if steps else \
      "dtype, remat and FSDP are already set"
  return (f"{nxt}. Or lower the batch: --search_batch finds the largest that fits, and "
          "--config.batch_size=N scales the recipe's lr and EMA to it (docs/training.md), or use "
          "a larger slice (docs/scale.md)")


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  _ensure_cpu_devices(argv)
  try:
    fv, rest = _parser().parse_known_args(argv[1:])
  except SystemExit as e:   # cli.ArgumentParser printed its one error line
    return int(e.code or 0) if not isinstance(e.code, str) else EXIT_BAD_INPUT
  bad = [r for r in rest if not r.startswith("--config.")]
  if bad:
    print(f"error: unknown arguments {bad} (see python -m d2v_jax.compile --help)", file=sys.stderr)
    return EXIT_BAD_INPUT
  if fv.table:
    if fv.config is not None:
      print("error: --table builds its own configs (--entries); drop --config", file=sys.stderr)
      return EXIT_BAD_INPUT
    topologies = tuple(fv.topologies.split(","))
    if fv.fits:
      entries = tuple(fv.entries) if fv.entries else scale_table.FIT_ENTRIES
      scale_table.fit_table(fv.table, entries=entries, topologies=topologies,
                            force_cpu=fv.fallback, cache_path=fv.cache,
                            max_trials=min(fv.max_trials, 4))
    else:
      entries = tuple(fv.entries) if fv.entries else tuple(scale_table.TABLE_ENTRIES)
      scale_table.table(fv.table, entries=entries, topologies=topologies,
                        force_cpu=fv.fallback, cache_path=fv.cache)
    print(f"wrote {fv.table}")
    return EXIT_OK
  if fv.config is None:
    print("error: --config is required, e.g. --config configs/text.py:variant=base",
          file=sys.stderr)
    return EXIT_BAD_INPUT
  try:
    cfg = config_lib.parse_argv([argv[0], "--config", fv.config, *rest]).config
    topo = parse_topology(fv.topology, fv.num_slices)
  except (config_lib.ConfigError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
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
      print(scaling.at_batch(cfg, report.global_batch), flush=True)
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
          f"device): it {used}. {oom_advice(cfg, topo)}", file=sys.stderr)
    return EXIT_NO_FIT
  return EXIT_OK


if __name__ == "__main__":
  sys.exit(main())
