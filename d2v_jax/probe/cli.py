"""Linear and k-NN probes on frozen data2vec features.

  python -m d2v_jax.probe --workdir RUN_DIR --data PATH [--weights student|teacher]
      [--layer N] [--random-init | --baseline] [--step S] [--seed 0] [--repeats 1] [--k 20]
      [--out JSON]

Features: the end-of-block output of block N (1-based; negative counts from the end; default
the last block), mean-pooled over the valid, non-extra tokens (no CLS, no padding) of the
unmasked input; no final norm, no head. Data: a folder per class (images: the trainer's list,
d2v_jax.data.vision.EXTENSIONS or the run's data.extensions; audio: the trainer's
d2v_jax.data.audio.EXTENSIONS / list_files, e.g. .wav .flac .ogg .mp3) or, for text, a TSV
of `text<TAB>label` lines.
Preprocessing is the run's, without masking or augmentation: text is tokenized with the run's
tokenizer (data.tokenizer or WORKDIR/tokenizer) as <s> text </s> (its bos / eos, or [CLS] /
[SEP]), cut at data.block_size and padded with model.pad_id; images are decoded as in
training (alpha composited onto data.background), resized (shorter side) and
centre-cropped to model.image_size and normalised by data.mean /
data.std; audio is decoded at data.sample_rate, normalised per
utterance (data.normalize) and cut / zero-padded to data.max_samples from its start.
The same stratified, seeded splits (--test-frac held out; --repeats N splits with seeds
seed..seed+N-1, reported as mean +- std) serve every row, so pretrained and random init are
compared on the same examples. The probes: multinomial logistic regression on
standardised features, and k-NN (cosine) on the same standardised features.
`--random-init` probes a fresh init of the run's architecture (seed: the run's cfg.seed, i.e.
the run's own starting weights); `--baseline` prints both rows in one call.
"""

from __future__ import annotations

import json
import os
import sys
import time

from d2v_jax import console  # noqa: F401,E402  (first: quiet console)

os.environ.setdefault("USE_TF", "0")  # transformers: tokenizer only, no TF model classes

import jax  # noqa: E402
import numpy as np  # noqa: E402

from d2v_jax import build as build_lib, checkpoint, cli, config as config_lib, distributed, export, rundir  # noqa: E402
from d2v_jax.config import ConfigError  # noqa: E402
from d2v_jax.modality import load as load_modality  # noqa: E402
from d2v_jax.probe.features import FeatureEncoder  # noqa: E402
from d2v_jax.probe.fit import fit_probes_repeated, split  # noqa: E402
from d2v_jax.probe.rank import effective_rank_from_gram  # noqa: E402


# ---------------------------------------------------------------------------- CLI


def load_labelled(cfg, workdir: str | None, path: str):
  """The labelled set at `path`, preprocessed by the run's modality (data/<m>.py labelled_set)."""
  return load_modality(cfg.modality).data.labelled_set(cfg, workdir, path)


def run_config(workdir: str):
  """The run's resolved config: WORKDIR/config.json (written at start-up), else checkpoint meta."""
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      return config_lib.from_dict(json.load(f))
  _, meta = checkpoint.read_meta(workdir)
  return config_lib.from_dict(meta["config"])


def probe(workdir: str, data: str, *, weights: str = "student", layer: int = -1,
          random_init: bool = False, baseline: bool = False, step: int | None = None,
          seed: int = 0, test_frac: float = 0.3, k: int = 20, c: float = 1.0,
          init_seed: int | None = None, repeats: int = 1) -> dict | None:
  """Probe rows for the run (and / or a random init of its architecture); see module doc.
  With several processes only process 0 probes; the others join the checkpoint restore
  (orbax needs every process) and return None."""
  rows_to_do = ([] if random_init else [weights]) + (["random-init"] if random_init or baseline else [])
  params_of, ckpt_step = {}, None
  if not random_init:
    params, cfg, ckpt_step, built = export.restore_params(workdir, weights, step)
    params_of[weights] = params
  if not distributed.is_writer():
    return None
  if random_init:
    cfg = run_config(workdir)
    cfg.mesh.update(dict(data=-1, fsdp=1, tensor=1))
    built = build_lib.build(cfg, devices=jax.local_devices()[:1])
  if "random-init" in rows_to_do:
    s = int(cfg.seed if init_seed is None else init_seed)
    params_of["random-init"] = jax.device_get(built.init(s).params)
  enc = FeatureEncoder(built, layer)  # a bad --layer fails before the data is read
  t0 = time.time()
  ds = load_labelled(cfg, workdir, data)
  t_load = time.time() - t0
  splits = [split(ds.labels, test_frac, seed + i) for i in range(max(1, repeats))]
  rows = []
  for name in rows_to_do:
    t0 = time.time()
    feats = enc(jax.device_put(params_of[name], enc._rep), ds.arrays)
    res = fit_probes_repeated(feats.pooled, ds.labels, splits, k=k, c=c)
    res.update(weights=name, effective_rank=effective_rank_from_gram(feats.gram),
               seconds=round(time.time() - t0, 1))
    rows.append(res)
  return {"workdir": os.path.abspath(workdir), "data": os.path.abspath(data),
          "modality": cfg.modality, "step": ckpt_step, "layer": enc.index + 1,
          "num_layers": enc.num_layers, "hidden": int(cfg.model.encoder.hidden),
          "classes": ds.classes, "class_sizes": np.bincount(ds.labels).tolist(),
          "split_seeds": list(range(seed, seed + max(1, repeats))), "test_frac": test_frac,
          "load_seconds": round(t_load, 1), "rows": rows}


def format_table(result: dict) -> str:
  r0 = result["rows"][0]
  n = len(result["split_seeds"])
  head = (f"probe {result['data']} | {result['modality']} run {result['workdir']} "
          f"step {result['step']} | layer {result['layer']}/{result['num_layers']} | "
          f"{len(result['classes'])} classes, train {r0['n_train']} / test {r0['n_test']}"
          + (f" | mean +- std over {n} splits" if n > 1 else ""))
  acc = lambda r, key: (f"{r[key]:.4f}" + (f" +- {r[key + '_std']:.4f}" if n > 1 else ""))
  w = 17 if n > 1 else 8
  knn = f"k-NN(k={r0['k']})"
  lines = [head, f"{'weights':<13} {'linear':>{w}} {knn:>{w}} {'chance':>8} {'eff.rank':>9}"]
  for r in result["rows"]:
    lines.append(f"{r['weights']:<13} {acc(r, 'linear_acc'):>{w}} {acc(r, 'knn_acc'):>{w}} "
                 f"{r['chance']:>8.4f} {r['effective_rank']:>9.2f}")
  return "\n".join(lines)


def main(argv=None) -> None:
  p = cli.ArgumentParser(prog="python -m d2v_jax.probe", description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="run directory written by d2v_jax.train")
  p.add_argument("--data", required=True,
                 help="labelled set: folder per class (images, audio) or text<TAB>label TSV (text)")
  p.add_argument("--weights", default="student", choices=("student", "teacher"))
  p.add_argument("--layer", type=int, default=-1, help="block number 1..L, or -1 (last) .. -L")
  g = p.add_mutually_exclusive_group()
  g.add_argument("--random-init", action="store_true",
                 help="probe a fresh init of the run's architecture instead of its checkpoint")
  g.add_argument("--baseline", action="store_true", help="probe the checkpoint and a random init")
  p.add_argument("--init-seed", type=int, default=None, help="random-init seed (default: the run's)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--seed", type=int, default=0, help="seed of the stratified train/test split")
  p.add_argument("--test-frac", type=float, default=0.3)
  p.add_argument("--repeats", type=int, default=1,
                 help="stratified splits with seeds seed..seed+N-1; reports mean +- std")
  p.add_argument("--k", type=int, default=20, help="neighbours of the k-NN probe")
  p.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the linear probe")
  p.add_argument("--out", default=None, help="JSON file (default WORKDIR/probe/<tag>.json)")
  distributed.add_args(p)
  a = p.parse_args(argv)
  distributed.initialize_from_args(a)
  why = rundir.problem(a.out, "file") if a.out else None
  if why:   # found before the probe runs, not when its result is written
    cli.fail(f"cannot write --out {a.out} ({why}); choose another --out")
  try:
    res = probe(a.workdir, a.data, weights=a.weights, layer=a.layer, random_init=a.random_init,
                baseline=a.baseline, step=a.step, seed=a.seed, test_frac=a.test_frac, k=a.k,
                c=a.C, init_seed=a.init_seed, repeats=a.repeats)
  except (ConfigError, export.ExportError, checkpoint.NoCheckpoint, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2)
  if res is None:
    return   # not process 0: it joined the restore; process 0 probes and reports
  print(format_table(res))
  tag = "random" if a.random_init else a.weights + ("+random" if a.baseline else "")
  data_name = os.path.splitext(os.path.basename(os.path.normpath(a.data)))[0]
  out = a.out or os.path.join(a.workdir, "probe", f"{data_name}_{tag}_layer{res['layer']}.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(res, f, indent=2)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
