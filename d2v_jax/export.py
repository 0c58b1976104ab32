"""Run directory -> Hugging Face directory.

  python -m d2v_jax.export --workdir RUN_DIR --out HF_DIR [--weights student|teacher] [--step N]

Restores the checkpoint on one CPU device (whatever mesh it was written on) and writes it
through the modality's map (d2v_jax/hf/<modality>.py tables, d2v_jax/hf/common.py walk).
Default weights: the student, as the official
fairseq/data2vec_vision -> HF conversions did; `--weights teacher` exports the EMA teacher
(its EMA subtrees, plus the student's shared ones, e.g. text embeddings). The resolved
training config travels with the export (d2v_config.json); a text export carries the run's
tokenizer and its special ids (bos / eos / pad in config.json: <s> </s> <pad>, or [CLS] [SEP]
[PAD] for a BERT vocabulary). A run written by `python -m d2v_jax.init --hf DIR` (step 0, no
training) exports the imported weights unchanged.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

from d2v_jax import console  # noqa: F401,E402  (first: quiet console)

import jax  # noqa: E402

from d2v_jax import build as build_lib, checkpoint, cli, config as config_lib, distributed, ema, rundir  # noqa: E402
from d2v_jax.hf import common as hf_common  # noqa: E402

MARKER = "d2v_export.json"


class ExportError(ValueError):
  pass


def check_out_dir(out: str, workdir: str, overwrite: bool) -> None:
  """Refuses to write into a directory holding something else (another model, other files)."""
  why = rundir.problem(out, "dir")
  if why:
    raise ExportError(f"cannot write --out {out} ({why}); choose another --out")
  if not os.path.isdir(out) or not os.listdir(out) or overwrite:
    return
  marker = os.path.join(out, MARKER)
  if os.path.exists(marker):
    with open(marker) as f:
      prev = json.load(f)
    if prev.get("workdir") == os.path.abspath(workdir):
      return  # re-exporting the same run is an update, not a clobber
    raise ExportError(f"{out} already holds an export of {prev.get('workdir')}; "
                      f"pass --overwrite to replace it or choose another --out")
  raise ExportError(f"{out} is not empty and was not written by d2v_jax.export; "
                    f"pass --overwrite to replace its model files or choose another --out")


def restore_params(workdir: str, weights: str = "student", step: int | None = None):
  """(params tree on host, resolved cfg, step) of a run, restored on a single device."""
  step, meta = checkpoint.read_meta(workdir, step)
  cfg = config_lib.from_dict(meta["config"])
  cfg.mesh.update(dict(data=-1, fsdp=1, tensor=1))  # whatever it was trained on: one device here
  # A local device: with several processes (a pod host each) every one restores the whole tree.
  built = build_lib.build(cfg, devices=jax.local_devices()[:1])
  mngr = checkpoint.manager(workdir, async_save=False)
  try:
    state, _ = checkpoint.restore(mngr, built.abstract_state, built.state_shardings, step)
  except Exception as e:   # its config is the checkpoint's own: a read error is damage
    raise checkpoint.DamagedCheckpoint(checkpoint.damaged_message(
        workdir, step, e, checkpoint.steps_on_disk(workdir))) from None
  finally:
    mngr.close()
  if weights == "student":
    params = state.params
  elif weights == "teacher":
    params = ema.teacher_params(state.params, state.teacher)
  else:
    raise ExportError(f"--weights={weights!r}: use student or teacher")
  return jax.device_get(params), cfg, step, built


def export(workdir: str, out: str, weights: str = "student", step: int | None = None,
           overwrite: bool = False) -> str:
  writer = distributed.is_writer()
  if writer:
    check_out_dir(out, workdir, overwrite)
  params, cfg, step, built = restore_params(workdir, weights, step)  # every process: orbax
  if not writer:
    return out
  hf_map = built.modality.hf()   # a modality without an HF map: one error, nothing written
  remote = hf_map.remote_map(cfg) if hasattr(hf_map, "remote_map") else None
  if remote:   # a model its usual class cannot hold: the map with remote code
    hf_map = importlib.import_module(remote)
  os.makedirs(out, exist_ok=True)
  hf_common.export(hf_map, params, cfg, out, workdir)
  hf_common.write_json({"workdir": os.path.abspath(workdir), "step": step, "weights": weights,
                        "modality": cfg.modality}, os.path.join(out, MARKER))
  return out


def main(argv=None) -> None:
  p = cli.ArgumentParser(prog="python -m d2v_jax.export", description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="run directory written by d2v_jax.train")
  p.add_argument("--out", required=True, help="HF directory to write")
  p.add_argument("--weights", default="student", choices=("student", "teacher"),
                 help="student (default, as the official HF conversions) or the EMA teacher")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
  distributed.add_args(p)
  a = p.parse_args(argv)
  distributed.initialize_from_args(a)
  try:
    out = export(a.workdir, a.out, a.weights, a.step, a.overwrite)
  except (ExportError, checkpoint.NoCheckpoint, checkpoint.DamagedCheckpoint,
          config_lib.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2)
  if distributed.is_writer():
    print(f"exported {a.weights} weights of {a.workdir} to {os.path.abspath(out)}")


if __name__ == "__main__":
  main()
