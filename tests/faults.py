"""Fault injection for the resume / preemption tests, installed by the tests (never by the
package) as a d2v_jax.hooks step hook:

  D2V_TEST_KILL=after_step:N           SIGKILL after step N, once the save in flight is on
                                       disk (between checkpoints)
  D2V_TEST_KILL=in_save:N              SIGKILL right after the async save of step N started
  D2V_TEST_KILL=sigterm_after_step:N   SIGTERM after step N (preemption of one process of
                                       several, at a known step)

In-process: `install()` (the `faults` fixture of the tests that use it). In a trainer
subprocess: reliability_utils.env() puts tests/fault_site first on PYTHONPATH, whose
sitecustomize.py installs it when D2V_TEST_KILL is set.
"""

from __future__ import annotations

import os
import signal

from d2v_jax import hooks

_POINTS = {"after_step": "after_step", "in_save": "save_started"}


def _hook(point: str, step: int, saver) -> None:
  want = os.environ.get("D2V_TEST_KILL")
  if not want:
    return
  if point == "after_step" and want == f"sigterm_after_step:{step}":
    print(f"D2V_TEST_KILL: SIGTERM at {want}", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    return
  kind, _, n = want.partition(":")
  if _POINTS.get(kind) != point or n != str(step):
    return
  if point == "after_step" and saver is not None:
    saver.poll(block=True)
  print(f"D2V_TEST_KILL: SIGKILL at {want}", flush=True)
  os.kill(os.getpid(), signal.SIGKILL)


def install() -> None:
  if _hook not in hooks.STEP_HOOKS:
    hooks.STEP_HOOKS.append(_hook)


def uninstall() -> None:
  if _hook in hooks.STEP_HOOKS:
    hooks.STEP_HOOKS.remove(_hook)
