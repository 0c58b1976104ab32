"""The v1-vs-v2 equal-wall-time table from the runs' probe curves (tools/v1_vs_v2.sh).

  python tools/v1_vs_v2.py RUN_V1 RUN_V2 PROBE_DATA [--short RUN_V2_SHORT]
  python tools/v1_vs_v2.py RUN_V1 RUN_V2 --third-steps

v1's wall time W is the elapsed_s of its last logged step (metrics.jsonl: the training loop's
time in that launch, the first step's compile included). RUN_V2 checkpoints often; the table
takes its last checkpoint within W / 3 and within W. `--third-steps` prints that W / 3 step
count, for RUN_V2_SHORT: a v2 run whose whole schedule (warm-up, decay) fits in W / 3, which
is the fair "v2 at a third of v1's time" (a mid-schedule checkpoint still has a high lr).
"""

from __future__ import annotations

import argparse
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
  with open(os.path.join(run, "probe", f"curve_{name}.json")) as f:
    return {(r["step"], r["weights"]): r for r in json.load(f)["rows"]}


def _ckpt_steps(run: str) -> list[int]:
  d = os.path.join(run, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit())


def _within(t2: dict, steps, budget: float):
  ok = [s for s in steps if s in t2 and t2[s] <= budget]
  return max(ok) if ok else None


def third_steps(run1: str, run2: str) -> int:
  t1, t2 = _elapsed(run1), _elapsed(run2)
  s = _within(t2, _ckpt_steps(run2), t1[max(t1)] / 3)
  if s is None:
    sys.exit(f"{run2} has no checkpoint within a third of {run1}'s wall time")
  return s


def table(run1: str, run2: str, data: str, short: str | None = None) -> list[str]:
  t1, t2 = _elapsed(run1), _elapsed(run2)
  c1, c2 = _curve(run1, data), _curve(run2, data)
  last1 = max(s for s, w in c1 if w == "student")
  wall = t1[max(t1)]
  v1 = c1[(last1, "student")]
  fmt = lambda r: f"{r['linear_acc']:.3f} +- {r['linear_acc_std']:.3f} (rank {r['effective_rank']:.1f})"
  lines = [f"random init: {fmt(c1[(0, 'init')])}", f"v1 step {last1} at {wall:.0f} s: {fmt(v1)}"]
  steps2 = sorted(s for s, w in c2 if w == "student")
  for frac, label in ((1 / 3, "W/3"), (1.0, "W")):
    s = _within(t2, steps2, wall * frac)
    lines.append(f"v2 checkpoint within {label} ({wall * frac:.0f} s): " +
                 (f"step {s} at {t2[s]:.0f} s: {fmt(c2[(s, 'student')])}" if s else "none"))
  if short:
    ts, cs = _elapsed(short), _curve(short, data)
    last = max(s for s, w in cs if w == "student")
    r = cs[(last, "student")]
    lines.append(f"v2 with a W/3 schedule: step {last} at {ts[max(ts)]:.0f} s: {fmt(r)}; "
                 f"reaches v1's final accuracy: {'yes' if r['linear_acc'] >= v1['linear_acc'] else 'no'}")
  first = [s for s in steps2 if s in t2 and c2[(s, "student")]["linear_acc"] >= v1["linear_acc"]]
  lines.append("v2 (long run) first reaches v1's final accuracy: " +
               (f"step {first[0]} at {t2[first[0]]:.0f} s = {t2[first[0]] / wall:.2f} W" if first
                else "not within its run"))
  return lines


if __name__ == "__main__":
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("run_v1")
  p.add_argument("run_v2")
  p.add_argument("data", nargs="?")
  p.add_argument("--short", default=None)
  p.add_argument("--third-steps", action="store_true")
  a = p.parse_args()
  if a.third_steps:
    print(third_steps(a.run_v1, a.run_v2))
  elif not a.data:
    p.error("PROBE_DATA is required for the table")
  else:
    print("\n".join(table(a.run_v1, a.run_v2, a.data, a.short)))
