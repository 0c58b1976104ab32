"""A Hugging Face directory or a fairseq checkpoint -> a run directory, without a training step.

  python -m d2v_jax.init --hf HF_DIR --workdir RUN_DIR [--config configs/text.py:variant=base]
      [--config.KEY=VALUE ...]
  python -m d2v_jax.init --fairseq CKPT.pt --workdir RUN_DIR [--vocab FAIRSEQ_VOCAB_DIR]
      [--config ...] [--config.KEY=VALUE ...]

--fairseq: a data2vec checkpoint of fairseq (1.0 text / audio, the 1.0 vision port, 2.0
text / audio / image): student, EMA teacher and head / decoder, with the architecture and
objective of its cfg (d2v_jax/fairseq_io). --config defaults to configs/<modality>.py with
variant=base (plus v2 for a 2.0 model). Text needs its vocabulary: --vocab DIR (fairseq's
dict.txt, encoder.json, vocab.bpe) writes an HF tokenizer to RUN_DIR/tokenizer, or pass
--config.data.tokenizer.

writes RUN_DIR/config.json and a checkpoint at step 0 holding the imported weights (the
regression head freshly initialised): then d2v_jax.export, or continued pretraining with the
same --config.init.hf (d2v_jax/init_weights.py). --config defaults to the modality's file,
picked by config.json's model_type (hf/<modality>.py FAMILIES).
"""

from __future__ import annotations

import os
import shutil
import sys

from d2v_jax import console  # noqa: F401  (before jax / TF: quiet console)

import jax  # noqa: E402
from absl import flags  # noqa: E402

from d2v_jax import build as build_lib, checkpoint, cli, config as config_lib, modality, resolve, rundir  # noqa: E402
from d2v_jax.data import fairseq_vocab  # noqa: E402
from d2v_jax.fairseq_io import load as fairseq_load  # noqa: E402
from d2v_jax.init_weights import init_keys, initial_params, read_hf_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _refuse_existing(workdir: str) -> None:
  try:
    step, _ = checkpoint.read_meta(workdir)
  except checkpoint.NoCheckpoint:
    return
  raise config_lib.ConfigError(f"{workdir} already holds a checkpoint (step {step}); choose "
                               "another --workdir")


def write_run(cfg, workdir: str) -> int:
  """init.hf (or init.checkpoint) of cfg -> WORKDIR/config.json + a checkpoint at step 0.
  Refuses a run directory that already holds a checkpoint. Returns the step written (0)."""
  if not any(init_keys(cfg)) and not cfg.init.fairseq:
    raise config_lib.ConfigError("nothing to import: set --hf DIR (init.hf), --fairseq CKPT "
                                 "(init.fairseq) or init.checkpoint")
  _refuse_existing(workdir)
  mod = resolve.resolve(cfg)    # the architecture from init.hf / init.fairseq; no data read
  built = build_lib.build(cfg, mod=mod)
  state = initial_params(cfg, built, built.init(cfg.seed))
  os.makedirs(workdir, exist_ok=True)
  mngr = checkpoint.manager(workdir, async_save=False)
  try:
    checkpoint.save(mngr, 0, state, {"step": 0, "data_position": 0, "modality": cfg.modality,
                                     "config": config_lib.to_dict(cfg)})
    mngr.wait_until_finished()
  finally:
    mngr.close()
  if jax.process_index() == 0:
    config_lib.write_resolved(cfg, workdir)
  return 0


def _default_config(hf_path: str) -> str:
  hf_json = read_hf_config(hf_path) if os.path.isdir(hf_path) else None
  if hf_json is None:
    raise config_lib.ConfigError(f"--hf {hf_path!r} has no config.json; pass --config "
                                 "configs/<modality>.py")
  model_type = hf_json.get("model_type", "?")
  maps = modality.hf_modules()
  found = [m for m, hf_map in maps.items() if model_type in hf_map.FAMILIES]
  if not found:
    importable = sorted(f for hf_map in maps.values() for f in hf_map.FAMILIES)
    raise config_lib.ConfigError(f"--hf {hf_path!r} holds a {model_type!r} model; "
                                 f"importable: {importable}")
  return os.path.join(ROOT, "configs", f"{found[0]}.py")


def _fairseq_config(path: str) -> str:
  layout = fairseq_load.read(path)[2]
  return os.path.join(ROOT, "configs", f"{layout.modality}.py") + (
      ":variant=base,v2" if layout.objective == "v2" else ":variant=base")


def main(argv=None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  p = cli.ArgumentParser(prog="python -m d2v_jax.init",
                              description="Hugging Face directory or fairseq checkpoint -> run "
                                          "directory (step 0)")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--hf", help="HF model directory (config.json + weights)")
  src.add_argument("--fairseq", help="fairseq data2vec checkpoint (.pt)")
  p.add_argument("--vocab", default=None,
                 help="text + --fairseq: folder with fairseq's dict.txt, encoder.json, vocab.bpe")
  p.add_argument("--workdir", required=True, help="run directory to write")
  p.add_argument("--config", default=None,
                 help="config file[:args] (default: configs/<modality>.py of the weights)")
  a, rest = p.parse_known_args(argv)
  bad = [r for r in rest if not r.startswith("--config.")]
  if bad:
    p.error(f"unknown arguments {bad}")
  if a.vocab and not a.fairseq:
    p.error("--vocab goes with --fairseq (an HF directory carries its own tokenizer)")
  existed = os.path.isdir(a.workdir)
  tok_dir = os.path.join(a.workdir, "tokenizer")
  lock = None
  try:
    _refuse_existing(a.workdir)
    problem = rundir.problem(a.workdir, "dir")
    if problem:
      raise config_lib.ConfigError(f"cannot write --workdir {a.workdir} ({problem})")
    os.makedirs(a.workdir, exist_ok=True)
    # One owner per run directory (d2v_jax/rundir.py), as the trainer: nothing else writes it
    # while the import does; a directory made for it goes again on an error.
    lock = rundir.take(a.workdir, jax.process_index(), jax.process_count(), remove_dir=not existed)
    if a.fairseq:
      spec = a.config or _fairseq_config(a.fairseq)
      extra = [f"--config.init.fairseq={a.fairseq}"]
      if a.vocab:
        if os.path.exists(tok_dir):
          raise config_lib.ConfigError(f"{tok_dir} exists; --vocab writes the tokenizer there: "
                                       "choose another --workdir")
        fairseq_vocab.build_from_dir(a.vocab, tok_dir)
        extra.append(f"--config.data.tokenizer={os.path.abspath(tok_dir)}")
    else:
      spec = a.config or _default_config(a.hf)
      extra = [f"--config.init.hf={a.hf}"]
    fv = config_lib.parse_argv([p.prog, "--config", spec, *extra, *rest], flags.FlagValues())
    cfg = fv.config
    write_run(cfg, a.workdir)
  except config_lib.ConfigError as e:
    if a.vocab and not existed:   # nothing half-written: the tokenizer this call made
      shutil.rmtree(tok_dir, ignore_errors=True)
    if lock is not None:
      lock.release()
      lock = None
    config_lib.die(str(e))
  finally:
    if lock is not None:
      lock.release()
  if jax.process_index() == 0:
    print(f"wrote {os.path.abspath(a.workdir)}: checkpoint step 0 = {a.hf or a.fairseq} "
          f"({cfg.model.encoder.num_layers} layers x {cfg.model.encoder.hidden}), no training "
          f"step; export: python -m d2v_jax.export --workdir {a.workdir} --out OUT", flush=True)


if __name__ == "__main__":
  main()
