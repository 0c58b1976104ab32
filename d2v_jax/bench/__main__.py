"""python -m d2v_jax.bench NAME [options]; `python -m d2v_jax.bench NAME --help` per benchmark.

A benchmark is a module with a one-line docstring, `add_args(parser)` and `main(args) -> int`;
register it in BENCHMARKS (heavy imports belong inside main, so --help stays fast).
"""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = {
    "input": "d2v_jax.bench.input",   # host input pipeline (tf.data + masking), 1 core / all
}


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m d2v_jax.bench")
  sub = parser.add_subparsers(dest="benchmark", required=True,
                              metavar="{" + ",".join(BENCHMARKS) + "}")
  for name, module_name in BENCHMARKS.items():
    module = importlib.import_module(module_name)
    p = sub.add_parser(name, help=(module.__doc__ or name).strip().splitlines()[0])
    module.add_args(p)
    p.set_defaults(run=module.main)
  args = parser.parse_args(argv)
  return args.run(args)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
