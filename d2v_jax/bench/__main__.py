"""python -m d2v_jax.bench NAME [options]; `python -m d2v_jax.bench NAME --help` per benchmark.

A benchmark is a module with a one-line docstring, `add_args(parser)` and `main(args) -> int`;
register it in BENCHMARKS. Only the chosen benchmark is imported, after the process-wide
settings it needs (_environment), so `--help` stays fast and a module imports at its top.
"""

from __future__ import annotations

import importlib
import os
import sys
from d2v_jax import console  # noqa: F401,E402  (first: quiet console, d2v_jax/console.py)
from d2v_jax import cli, distributed  # noqa: E402
from d2v_jax.config import ConfigError  # noqa: E402

BENCHMARKS = {   # name: what it measures (module d2v_jax.bench.<name>)
    "step": "our jitted step vs a PyTorch reference, per modality",
    "mfu": "model FLOPs / step time vs a measured matmul peak",
    "input": "host input pipeline (tf.data + masking), 1 core / all",
    "compile": "compile time of the step per modality and size",
    "memory": "peak host RSS of a tiny training run per modality",
    "profile": "where the step's time goes (XLA thunk traces)",
    "gpu": "base models on a GPU: time, memory, MFU per attention",
    "v2": "data2vec 1.0 vs 2.0: FLOPs / time per masked token",
}


def _environment(name: str) -> None:
  """Process-wide settings that must precede the first jax / transformers import."""
  os.environ.setdefault("USE_TF", "0")                 # transformers: no TF model classes
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  # A libtpu wheel in the venv (TPU AOT compiles) makes jax probe for a TPU and print
  # warnings on a host without one; the benchmarks run on whatever JAX_PLATFORMS says.
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  if name == "profile":
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_enable_xprof_traceme" not in flags:
      os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_enable_xprof_traceme=true").strip()


def main(argv: list[str]) -> int:
  if not argv or argv[0] not in BENCHMARKS:   # usage, the list, or one line naming a bad name
    top = cli.ArgumentParser(prog="python -m d2v_jax.bench", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="benchmark", required=True, metavar="{" + ",".join(BENCHMARKS) + "}")
    for name, what in BENCHMARKS.items():
      sub.add_parser(name, help=what)
    top.parse_args(argv)
    return 2
  name = argv[0]
  _environment(name)
  module = importlib.import_module(f"d2v_jax.bench.{name}")
  p = cli.ArgumentParser(prog=f"python -m d2v_jax.bench {name}",
                         description=(module.__doc__ or name).strip().splitlines()[0])
  module.add_args(p)
  distributed.add_args(p)
  args = p.parse_args(argv[1:])
  args.benchmark = name
  distributed.initialize_from_args(args)   # the trainer's start-up: a pod host measures alike
  try:
    return module.main(args)
  except ConfigError as e:
    cli.fail(str(e))
  except SystemExit as e:   # a benchmark's `raise SystemExit("message")`: one error line, exit 2
    if cli.bad_exit(e):
      cli.fail(e.code)
    raise


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
