"""Benchmarks: `python -m d2v_jax.bench <name> ...` (see __main__.py for the list).

Shared output helpers: every benchmark prints a markdown table and writes the same numbers
as JSON (and the table as .md) next to each other, so docs and CI read one format.
"""

from __future__ import annotations

import json
import os
import platform
import time


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def machine() -> dict:
  """What the numbers were measured on."""
  return {"cpu": cpu_model(), "cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
          "platform": platform.platform(), "python": platform.python_version(),
          "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def markdown_table(rows: list[dict], columns: list[str]) -> str:
  def cell(v):
    if isinstance(v, float):
      return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"
    if isinstance(v, (list, dict)):
      return ""
    return str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def out_path(out: str, name: str) -> str:
  """--out is a directory (NAME.json goes in it) or a .json file path."""
  if not out:
    return ""
  return out if out.endswith(".json") else os.path.join(out, f"{name}.json")


def report(name: str, rows: list[dict], columns: list[str], out: str, **meta) -> str:
  """Prints the table; writes `out` (JSON: meta, machine, rows) and the table as `out`.md."""
  table = markdown_table(rows, columns)
  print(table)
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    payload = {"benchmark": name, **meta, "machine": machine(), "rows": rows}
    with open(out + ".tmp", "w") as f:
      json.dump(payload, f, indent=2)
    os.replace(out + ".tmp", out)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
      f.write(table + "\n")
    print(f"wrote {out}")
  return table
