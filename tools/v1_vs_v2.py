"""The v1-vs-v2 equal-wall-time table from two runs' probe curves (tools/v1_vs_v2.sh).

  python tools/v1_vs_v2.py RUN_V1 RUN_V2 PROBE_DATA

v1's wall time W is the elapsed_s of its last logged step (metrics.jsonl: training loop time
of the launch, first step's compile included). For v2 it takes the last checkpoint written
within W / 3 and within W, and prints their linear probe (student) next to v1's final one
and the random init, plus whether v2 reached v1's final accuracy within W / 3.
"""

from __future__ import annotations

import json
import os
import sys


def _elapsed(run: str) -> dict:
  out = {}
  with open(os.path.join(run, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if "elapsed_s" in r:
        out[r["step"]] = r["elapsed_s"]
  if not out:
    sys.exit(f"{run}/metrics.jsonl has no elapsed_s: train it with this version of d2v_jax")
  return out


def _curve(run: str, data: str) -> dict:
  name = os.path.splitext(os.path.basename(os.path.normpath(data)))[0]
  path = os.path.join(run, "probe", f"curve_{name}.json")
  with open(path) as f:
    rows = json.load(f)["rows"]
  return {(r["step"], r["weights"]): r for r in rows}


def table(run1: str, run2: str, data: str) -> list[str]:
  t1, t2 = _elapsed(run1), _elapsed(run2)
  c1, c2 = _curve(run1, data), _curve(run2, data)
  last1 = max(s for s, w in c1 if w == "student")
  wall = t1[max(t1)]
  v1 = c1[(last1, "student")]
  init = c1[(0, "init")]

  def pick(budget):
    steps = [s for s, w in c2 if w == "student" and s in t2 and t2[s] <= budget]
    return max(steps) if steps else None

  fmt = lambda r: f"{r['linear_acc']:.3f} +- {r['linear_acc_std']:.3f} (rank {r['effective_rank']:.1f})"
  lines = [f"random init: {fmt(init)}",
           f"v1 step {last1} at {wall:.0f} s: {fmt(v1)}"]
  reached = None
  for frac, label in ((1 / 3, "W/3"), (1.0, "W")):
    s = pick(wall * frac)
    if s is None:
      lines.append(f"v2 within {label} ({wall * frac:.0f} s): no checkpoint yet")
      continue
    r = c2[(s, "student")]
    lines.append(f"v2 within {label} ({wall * frac:.0f} s): step {s} at {t2[s]:.0f} s: {fmt(r)}")
    if frac < 1:
      reached = r["linear_acc"] >= v1["linear_acc"]
  first = [s for s, w in sorted(c2) if w == "student" and s in t2
           and c2[(s, w)]["linear_acc"] >= v1["linear_acc"]]
  lines.append(f"v2 reaches v1's final accuracy within W/3: {'yes' if reached else 'no'}; "
               + (f"first at step {first[0]} ({t2[first[0]]:.0f} s = {t2[first[0]] / wall:.2f} W)"
                  if first else "not within its run"))
  return lines


if __name__ == "__main__":
  if len(sys.argv) != 4:
    sys.exit(__doc__.strip().splitlines()[2].strip())
  print("\n".join(table(*sys.argv[1:])))
