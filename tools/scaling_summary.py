"""Markdown summary of tools/scaling_evidence.sh: for each run, the loss (log window mean) at
1/4, 1/2, 3/4 and all of the examples, lr and tau as the run used them, and the held-out probes
against the random init (margin in sd, as docs/evaluation.md).

  python tools/scaling_summary.py runs/scale_text_B runs/scale_text_4B_scaled ...
"""

from __future__ import annotations

import glob
import json
import os
import sys


def _loss_at(rows: list[dict], step: int) -> float:
  """Loss of the last logged window at or before `step`."""
  return [r["loss"] for r in rows if r["step"] <= step and "loss" in r][-1]


def summarise(run: str) -> str:
  cfg = json.load(open(os.path.join(run, "config.json")))
  rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
  rows = [r for r in rows if "loss" in r]
  total = cfg["total_steps"]
  losses = " / ".join(f"{_loss_at(rows, int(round(total * f))):.3f}" for f in (0.25, 0.5, 0.75, 1.0))
  probes = []
  for path in sorted(glob.glob(os.path.join(run, "probe", "*_student+random_*.json"))):
    p = json.load(open(path))
    s, r = p["rows"][0], p["rows"][1]
    margin = (s["linear_acc"] - r["linear_acc"]) / max(s["linear_acc_std"], r["linear_acc_std"], 1e-9)
    name = os.path.basename(path).split("_student")[0]
    probes.append(f"{name} {s['linear_acc']:.3f} +- {s['linear_acc_std']:.3f} "
                  f"(random {r['linear_acc']:.3f}, {margin:+.1f} sd; rank {s['effective_rank']:.0f})")
  return (f"| {os.path.basename(run)} | {cfg['batch_size']} x {total} | {cfg['optim']['lr']:.3g} | "
          f"{cfg['teacher']['tau_start']:.5g} -> {cfg['teacher']['tau_end']:.6g} | {losses} | "
          f"{'; '.join(probes)} |")


def main(runs: list[str]) -> None:
  print("| run | batch x steps | lr | tau | loss at 1/4, 1/2, 3/4, all examples | "
        "held-out linear probe (student vs random init) |")
  print("|---|---|---|---|---|---|")
  for run in runs:
    print(summarise(run))


if __name__ == "__main__":
  main(sys.argv[1:])
