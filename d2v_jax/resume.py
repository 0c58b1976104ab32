"""Which checkpoint a launch resumes from: the newest intact step, trained with this config.

restore(cfg, workdir, saver, built) verifies the newest step before training on it: its meta
item reads, its config is this one (d2v_jax/drift.py), its saved shapes fit the state this
config builds, every array reads back and is finite (checkpoints are only written finite).
A config that does not fit is the user's to fix (ConfigError, nothing moved). A step that does
not read back is damaged: the error names the step and the storage error; the step is moved to
WORKDIR/damaged_checkpoints/ (never deleted) and the next newest is tried, with a line saying
so, or, with --config.resume_strict=True, the launch is refused instead. With several
processes every process tries, and they agree (a step one of them cannot read is damaged).
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
from jax.experimental import multihost_utils

from d2v_jax import checkpoint, drift, watchdog
from d2v_jax.config import ConfigError


@dataclasses.dataclass
class Resumed:
  state: object
  meta: dict
  step: int
  changes: dict
  moved: list   # (step, where) of the damaged steps moved aside by this launch


def precheck(cfg, workdir: str) -> None:
  """The drift check against the newest step's config before any data is prepared (a refused
  resume must not cache a new corpus first). Keys resolved later (None now) are compared by
  restore(); a step whose meta does not read is restore()'s to judge."""
  try:
    step, meta = checkpoint.read_meta(workdir)
  except (checkpoint.NoCheckpoint, checkpoint.DamagedCheckpoint):
    return
  drift.check(cfg, meta["config"], step, workdir, skip_unset=True)


def _agree(bad: bool) -> bool:
  """True on every process when any process found the step damaged."""
  if jax.process_count() == 1:
    return bad
  vote = watchdog.StopVote()
  return watchdog.StopVote.result(vote.start(bad))


def _verify(cfg, workdir, saver, built, step):
  """(state, meta, changes, None) or (None, None, None, why-damaged); ConfigError when the
  config does not fit the step."""
  try:
    meta = saver.read_meta(step)
  except Exception as e:
    return None, None, None, f"its meta item does not read: {checkpoint.storage_error(e)}"
  changes = drift.check(cfg, meta["config"], step, workdir)
  try:
    saved = saver.saved_shapes(step)
  except Exception as e:
    return None, None, None, f"its metadata does not read: {checkpoint.storage_error(e)}"
  want = checkpoint.leaf_shapes(built.abstract_state)
  problems = checkpoint.fit_problems(saved, want)
  if problems:
    raise ConfigError(f"checkpoint step {step} of {workdir} does not fit this config: "
                      f"{'; '.join(problems)}; resume with the run's own config "
                      f"({os.path.join(workdir, 'config.json')}) or choose another --workdir")
  try:
    state, _ = saver.restore(built.abstract_state, built.state_shardings, step)
  except Exception as e:
    if not saved.keys() & want.keys():   # shapes not comparable: it may be the config's fault
      raise ConfigError(f"cannot restore checkpoint step {step} of {workdir} with this config "
                        f"({checkpoint.storage_error(e)}); resume with the run's own config "
                        f"({os.path.join(workdir, 'config.json')}) or choose another "
                        "--workdir") from None
    return None, None, None, checkpoint.storage_error(e)
  if not checkpoint.all_finite(state):
    return None, None, None, "it holds non-finite values, and checkpoints are only written finite"
  return state, meta, changes, None


def restore(cfg, workdir: str, saver: checkpoint.Saver, built) -> Resumed | None:
  """The newest intact step of the run (see the module doc), or None for a new run."""
  moved: list = []
  while True:
    steps = saver.finalized_steps()
    if not steps:
      if moved:
        raise ConfigError(f"no intact checkpoint is left in {workdir}: damaged steps "
                          f"{[s for s, _ in moved]} were moved to "
                          f"{os.path.join(workdir, checkpoint.DAMAGED_DIR)}; choose another "
                          "--workdir, or remove its checkpoints/ to start afresh")
      return None
    step = steps[-1]
    if jax.process_index() == 0:   # a large state takes a while to read: say what is happening
      print(f"restoring checkpoint step {step} of {workdir} ...", flush=True)
    state, meta, changes, why = _verify(cfg, workdir, saver, built, step)
    if not _agree(why is not None):
      return Resumed(state, meta, step, changes, moved)
    why = why or "another process of this job cannot read it"
    older = [s for s in steps if s < step]
    if cfg.resume_strict:
      raise ConfigError(
          f"checkpoint step {step} of {workdir} is damaged ({why}); "
          + (f"older steps: {older}; " if older else "there is no older step; ")
          + "rerun without --config.resume_strict=True to move it aside and resume from the "
          "newest intact step")
    if jax.process_index() == 0:
      where = saver.move_aside(step)
      print(f"warning: checkpoint step {step} of {workdir} is damaged ({why}); moved it to "
            f"{where} (not deleted); "
            + (f"trying step {older[-1]}" if older else "no older step to resume from"),
            file=sys.stderr, flush=True)
      moved.append((step, where))
    else:
      moved.append((step, None))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"d2v_damaged_{step}")
    saver.reload()
