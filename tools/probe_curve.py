"""Probe accuracy and effective rank at every checkpoint of a run (docs/evaluation.md).

  python tools/probe_curve.py --workdir RUN_DIR --data PATH [--layer -1] [--repeats 3] [--out JSON]

Row "init" is the run's own initial weights (seed cfg.seed, what step 0 was); then the student
and the teacher of every kept checkpoint. Same features, splits and probes as
`python -m d2v_jax.probe` (the in-training hook logs the same numbers as it trains).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("USE_TF", "0")
from d2v_jax import console  # noqa: F401,E402  (first: quiet console, before the start-up imports jax)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--data", required=True)
  p.add_argument("--layer", type=int, default=-1)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", default=None)
  from d2v_jax import distributed
  distributed.add_args(p)
  a = p.parse_args(argv)
  distributed.initialize_from_args(a)

  import jax

  from d2v_jax import build as build_lib, checkpoint, ema
  from d2v_jax.probe import cli as probe_cli
  from d2v_jax.probe.features import FeatureEncoder
  from d2v_jax.probe.fit import fit_probes_repeated, split
  from d2v_jax.probe.rank import effective_rank_from_gram

  cfg = probe_cli.run_config(a.workdir)
  cfg.mesh.update(dict(data=-1, fsdp=1, tensor=1))
  built = build_lib.build(cfg, devices=jax.local_devices()[:1])
  # With several processes every one restores each checkpoint (orbax); only process 0 probes.
  writer = distributed.is_writer()
  if writer:
    ds = probe_cli.load_labelled(cfg, a.workdir, a.data)
    splits = [split(ds.labels, 0.3, s) for s in range(a.repeats)]
    enc = FeatureEncoder(built, a.layer)

  def row(step, name, params):
    if not writer:
      return None
    f = enc(params, ds.arrays)
    r = fit_probes_repeated(f.pooled, ds.labels, splits)
    out = {"step": step, "weights": name, "linear_acc": r["linear_acc"],
           "linear_acc_std": r["linear_acc_std"], "knn_acc": r["knn_acc"],
           "knn_acc_std": r["knn_acc_std"], "chance": r["chance"],
           "effective_rank": effective_rank_from_gram(f.gram)}
    print(f"{step:>6} {name:<8} linear {out['linear_acc']:.4f} +- {out['linear_acc_std']:.4f}  "
          f"k-NN {out['knn_acc']:.4f} +- {out['knn_acc_std']:.4f}  chance {out['chance']:.4f}  "
          f"rank {out['effective_rank']:.2f}", flush=True)
    return out

  rows = [row(0, "init", built.init(cfg.seed).params)]
  mngr = checkpoint.manager(a.workdir, async_save=False)
  try:
    for step in sorted(mngr.all_steps()):
      state, _ = checkpoint.restore(mngr, built.abstract_state, built.state_shardings, step)
      rows.append(row(step, "student", state.params))
      rows.append(row(step, "teacher", ema.teacher_params(state.params, state.teacher)))
  finally:
    mngr.close()
  if not writer:
    return
  data_name = os.path.splitext(os.path.basename(os.path.normpath(a.data)))[0]
  out = a.out or os.path.join(a.workdir, "probe", f"curve_{data_name}.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump({"workdir": os.path.abspath(a.workdir), "data": os.path.abspath(a.data),
               "layer": enc.index + 1, "classes": ds.classes, "rows": rows}, f, indent=2)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
