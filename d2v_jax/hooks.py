"""Callbacks the training loop calls at fixed points, for tools and tests; a production run
registers none. Kept apart from train.py so that a hook registered before
`python -m d2v_jax.train` starts (tests/fault_site/sitecustomize.py) is the one the loop sees.

  STEP_HOOKS: hook(point, step, saver) with point "after_step" (the step and its bookkeeping
  are done; `saver` the checkpoint writer) or "save_started" (an async save of `step` was
  just started). tests/faults.py uses them to kill or preempt a run at a chosen step.
"""

from __future__ import annotations

from typing import Callable

STEP_HOOKS: list[Callable] = []


def call(point: str, step: int, saver=None) -> None:
  for hook in STEP_HOOKS:
    hook(point, step, saver)
