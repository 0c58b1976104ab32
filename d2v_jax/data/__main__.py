"""The input pipelines from the command line, for every modality.

  python -m d2v_jax.data batches --config configs/vision.py:variant=tiny,runlocal [--steps 3]
      [--workdir DIR]          a few batches of a config: shapes, value and mask statistics
  python -m d2v_jax.data prepare --config configs/text.py:variant=tiny,runlocal --workdir DIR
                               what the trainer prepares at start-up (tokenizer, caches, index)
  python -m d2v_jax.data train-tokenizer --input 'data/text/*.txt' --out DIR [--vocab-size N]
  python -m d2v_jax.data fairseq-vocab --vocab FAIRSEQ_DIR --out DIR
                               fairseq's dict.txt + GPT-2 encoder.json / vocab.bpe -> an HF
                               tokenizer giving the fairseq ids (data.tokenizer for init.fairseq)

Errors are one line on stderr and exit status 2.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from d2v_jax import console  # noqa: F401  (first: quiet console)

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from d2v_jax import cli, config as config_lib, resolve  # noqa: E402
from d2v_jax.config import ConfigError  # noqa: E402
from d2v_jax.data import fairseq_vocab, text_corpus  # noqa: E402
from d2v_jax.data.text_tokenizer import load_tokenizer, train_tokenizer  # noqa: E402


def _describe(batch: dict) -> str:
  parts = []
  for k, v in batch.items():
    v = np.asarray(v)
    stat = (f" {int(v.sum(-1).min())}-{int(v.sum(-1).max())} set per row" if v.dtype == bool
            else f" mean {v.mean():+.3f} std {v.std():.3f}" if v.dtype.kind == "f" else "")
    parts.append(f"{k} {v.shape}{stat}")
  return " | ".join(parts)


def main(argv: list[str] | None = None) -> int:
  p = cli.ArgumentParser(prog="python -m d2v_jax.data", description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="cmd", required=True)
  b = sub.add_parser("batches", help="print a few batches of a config (any modality)")
  b.add_argument("--steps", type=int, default=3)
  b.add_argument("--workdir", default=tempfile.gettempdir())
  r = sub.add_parser("prepare", help="prepare a config's data as the trainer does (caches, index)")
  r.add_argument("--workdir", required=True)
  t = sub.add_parser("train-tokenizer", help="train a byte-level BPE on text files")
  t.add_argument("--input", required=True, help="globs / directories of text files")
  t.add_argument("--out", required=True)
  t.add_argument("--vocab-size", type=int, default=50265)
  fv = sub.add_parser("fairseq-vocab", help="fairseq dict.txt + GPT-2 BPE -> HF tokenizer")
  fv.add_argument("--vocab", required=True, help="folder with dict.txt, encoder.json, vocab.bpe")
  fv.add_argument("--out", required=True)
  args, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
  t0 = time.time()
  try:
    if args.cmd == "train-tokenizer":
      if rest:
        p.error(f"unknown arguments {rest}")
      if os.path.exists(args.out):
        raise ConfigError(f"--out {args.out} exists; remove it or pick another directory")
      c = ml_collections.ConfigDict(dict(data=dict(source="files", path=args.input)))
      train_tokenizer(text_corpus.text_units(c), args.vocab_size, args.out)
      print(f"tokenizer: {args.out} ({len(load_tokenizer(args.out))} ids, {time.time() - t0:.1f} s)")
      return 0
    if args.cmd == "fairseq-vocab":
      if rest:
        p.error(f"unknown arguments {rest}")
      if os.path.exists(args.out):
        raise ConfigError(f"--out {args.out} exists; remove it or pick another directory")
      n = fairseq_vocab.build_from_dir(args.vocab, args.out)
      print(f"tokenizer: {args.out} ({n} ids = fairseq's dictionary + <mask>; "
            f"--config.data.tokenizer={args.out})")
      return 0
    cfg = config_lib.parse_argv([p.prog] + rest, flags.FlagValues()).config
    data = resolve.resolve(cfg, args.workdir).data   # checked, then the modality's prepare()
    if args.cmd == "prepare":
      print(f"prepared {cfg.modality} data of {cfg.data.path} in {args.workdir} "
            f"({time.time() - t0:.1f} s)")
      return 0
    it = iter(data.build_dataset(cfg, args.workdir, start_step=0, process_index=0, process_count=1))
    for s in range(args.steps):
      print(f"step {s}: {_describe(next(it))} ({time.time() - t0:.2f} s)")
  except (ConfigError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
