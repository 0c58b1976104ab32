"""What every command line shares for bad input: one `error:` line on stderr and exit 2.

argparse's own error path prints a usage block of several lines before its message; a user
(and a wrapper script) needs the message: `ArgumentParser` prints only
`error: <message> (python -m d2v_jax.x --help)`. Subparsers inherit the class.
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_BAD_INPUT = 2


def fail(message: str, code: int = EXIT_BAD_INPUT):
  """Prints `error: message` (one line) and exits with `code`."""
  text = " ".join(str(message).split("\n")).strip()
  print(text if text.startswith("error: ") else f"error: {text}", file=sys.stderr, flush=True)
  raise SystemExit(code)


def env_seconds(name: str, default: float, env=None) -> float:
  """A positive number of seconds from environment variable `name` (default when unset);
  ValueError with one line naming the variable otherwise."""
  env = os.environ if env is None else env
  raw = env.get(name, "").strip()
  try:
    value = float(raw) if raw else float(default)
  except ValueError:
    raise ValueError(f"{name}={raw!r} must be a number of seconds") from None
  if not value > 0:
    raise ValueError(f"{name}={raw!r} must be > 0 seconds")
  return value


class ArgumentParser(argparse.ArgumentParser):
  def error(self, message: str):
    fail(f"{message} (see {self.prog} --help)")


def bad_exit(e: SystemExit) -> bool:
  """A SystemExit raised with a message (`raise SystemExit("...")`): Python would print it
  bare and exit 1; entry points turn it into one `error:` line and exit 2."""
  return isinstance(e.code, str)
