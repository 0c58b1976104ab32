"""orbax checkpoints of the whole TrainState plus a JSON `meta` item (data position, config).

Saves are asynchronous (training continues while the previous step is written); every
process takes part (orbax writes each shard from the process that owns it). Restore asks
for the abstract state with the *current* shardings, so a run written on N devices
restores on M devices.

Crash safety (what `Saver` adds on top of orbax): orbax writes a step to
`<step>.orbax-checkpoint-tmp` and renames it when every item is committed, so a kill during
a save leaves the previous step as the latest; the trainer's manager removes such stale
temporary directories at start-up. A state with a non-finite value is never saved, and a
failed background save raises `CheckpointError` (orbax only logs it) at the next poll.
"""

from __future__ import annotations

import os
import re
import sys

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

TMP_SUFFIX = ".orbax-checkpoint-tmp"


class NoCheckpoint(FileNotFoundError):
  pass


class CheckpointError(RuntimeError):
  """A checkpoint could not be written; the message names the step and the cause."""


def manager(workdir: str, keep: int = 3, async_save: bool = True,
            cleanup_tmp: bool = False) -> ocp.CheckpointManager:
  """The run's CheckpointManager. `cleanup_tmp` removes unfinished saves of a crashed run:
  only the trainer may do that (an export next to a live run must not delete its saves)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=async_save,
                                         cleanup_tmp_directories=cleanup_tmp)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options, item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict, force: bool = False) -> bool:
  return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 meta=ocp.args.JsonSave(meta)), force=force)


def restore(mngr: ocp.CheckpointManager, abstract_state, shardings, step: int | None = None):
  """Returns (state, meta) of `step` (default: latest), placed with `shardings`."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise NoCheckpoint(f"no checkpoint in {mngr.directory}")
  target = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                   meta=ocp.args.JsonRestore()))
  return out["state"], out["meta"]


def read_meta(workdir: str, step: int | None = None) -> tuple[int, dict]:
  """Latest (step, meta) of a run directory without building the model."""
  path = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(path):
    raise NoCheckpoint(f"{workdir} has no checkpoints/ directory: train first "
                       f"(python -m d2v_jax.train --workdir {workdir} ...)")
  mngr = ocp.CheckpointManager(path, item_names=("state", "meta"))
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise NoCheckpoint(f"{path} holds no finished checkpoint: train first or check the path")
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  mngr.close()
  return step, meta


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.array(True)


def all_finite(tree) -> bool:
  """True when every float leaf of `tree` (sharded or not) is finite; one reduction on device."""
  return bool(jax.device_get(_all_finite(tree)))


# tensorstore inserts its whole JSON spec into some errors, at the end or before the
# [os_error_code=...] tag (which write fails first, and so the form, varies from run to run);
# the OS error around it is what the user needs. The spec holds no single quote.
_TENSORSTORE_SPEC = re.compile(r"\s*\[tensorstore_spec='[^']*'\]")


def first_line(e: BaseException) -> str:
  """One line of an exception; long ones keep both ends (the OS error is usually last)."""
  text = (str(e).strip() or type(e).__name__).splitlines()[0]
  text = _TENSORSTORE_SPEC.sub("", text)
  return text if len(text) <= 400 else text[:180] + " ... " + text[-220:]


class Saver:
  """The trainer's checkpoint writer: finite-only, async, failures raised (not logged)."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.mngr = manager(workdir, keep=keep, async_save=async_save, cleanup_tmp=True)
    self.directory = str(self.mngr.directory)
    self.pending: int | None = None   # step of the save in flight, checked by poll()

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  def steps(self) -> list[int]:
    return sorted(self.mngr.all_steps())

  def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
    """Starts an async save of `state` at `step`; False (and a warning) when the state holds a
    non-finite value, so a good checkpoint is never replaced by a poisoned one."""
    if step in self.mngr.all_steps():
      return False   # already on disk (e.g. SIGTERM right after a periodic save)
    if not all_finite(state):
      print(f"warning: state at step {step} has non-finite values; checkpoint not saved "
            f"(latest good checkpoint: {self.latest_step()})", file=sys.stderr, flush=True)
      return False
    self.poll(block=True)
    try:
      saved = save(self.mngr, step, state, meta, force=force)
    except Exception as e:  # a synchronous failure (e.g. the directory vanished)
      raise CheckpointError(f"saving checkpoint step {step} to {self.directory} failed: "
                            f"{first_line(e)}") from e
    if saved:
      self.pending = step
    return saved

  def poll(self, block: bool = False) -> None:
    """Raises CheckpointError if the save in flight failed. Non-blocking unless `block`."""
    if self.pending is None:
      return
    if not block and self.mngr.is_saving_in_progress():
      return
    step, self.pending = self.pending, None
    try:
      self.mngr.wait_until_finished()
      self.mngr.check_for_errors()
    except Exception as e:
      raise CheckpointError(f"saving checkpoint step {step} to {self.directory} failed: "
                            f"{first_line(e)}; {self._previous(step)}") from e
    if step not in self.finalized_steps():
      raise CheckpointError(f"saving checkpoint step {step} to {self.directory} failed: the step "
                            f"was not finalized (see the log above); {self._previous(step)}")

  def finalized_steps(self) -> list[int]:
    """Steps whose directory is complete on disk (not what the manager believes)."""
    return sorted(ocp.step.checkpoint_steps(self.directory))

  def _previous(self, step: int) -> str:
    done = [s for s in self.finalized_steps() if s < step]
    if not done:
      return "there is no earlier checkpoint"
    return f"the previous checkpoint (step {max(done)}) is intact"

  def restore(self, abstract_state, shardings, step: int | None = None):
    self.poll(block=True)
    return restore(self.mngr, abstract_state, shardings, step)

  def delete_after(self, step: int) -> list[int]:
    """Deletes checkpoints newer than `step` (written during an incident we roll back from)."""
    self.poll(block=True)
    gone = [s for s in self.mngr.all_steps() if s > step]
    for s in gone:
      self.mngr.delete(s)
    return gone

  def close(self) -> None:
    """Waits for the save in flight (raising its failure), then closes the manager."""
    try:
      self.poll(block=True)
    finally:
      self.mngr.close()
