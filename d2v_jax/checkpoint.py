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

import logging
import os
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

TMP_SUFFIX = ".orbax-checkpoint-tmp"
DAMAGED_DIR = "damaged_checkpoints"   # where a damaged step is moved (never deleted)


class _QuietOrbax(logging.Filter):
  """orbax logs a failed save or restore as pages of ERROR records with tracebacks (several
  per failure, from its background threads); Saver and the trainer raise the failure as one
  line naming the step and the storage error, so orbax's own records are dropped. Other
  libraries' absl records pass."""

  def filter(self, record: logging.LogRecord) -> bool:
    return f"{os.sep}orbax{os.sep}" not in (record.pathname or "")


logging.getLogger("absl").addFilter(_QuietOrbax())


def _unraisable(args, _previous=sys.unraisablehook) -> None:
  """tensorstore's completion callbacks of a failed read / write may fire after orbax closed
  the event loop they report to: a "RuntimeError: Event loop is closed" traceback per array,
  printed as an unraisable exception. That error carries nothing (the failure itself is raised
  as one line); every other unraisable exception is printed as usual."""
  exc = args.exc_value
  if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
    return
  _previous(args)


sys.unraisablehook = _unraisable


class NoCheckpoint(FileNotFoundError):
  pass


class CheckpointError(RuntimeError):
  """A checkpoint could not be written; the message names the step and the cause."""


class DamagedCheckpoint(ValueError):
  """A checkpoint step on disk cannot be read back (truncated, corrupt or missing files)."""


def steps_on_disk(workdir: str) -> list[int]:
  """Finished steps of a run directory (what the directory holds, not a manager's cache)."""
  path = os.path.join(os.path.abspath(workdir), "checkpoints")
  return sorted(ocp.step.checkpoint_steps(path)) if os.path.isdir(path) else []


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
  steps = steps_on_disk(workdir)
  if not steps:
    raise NoCheckpoint(f"{path} holds no finished checkpoint: train first or check the path")
  if step is not None and step not in steps:
    raise NoCheckpoint(f"{workdir} has no checkpoint step {step}; its steps: {steps}")
  step = steps[-1] if step is None else step
  mngr = ocp.CheckpointManager(path, item_names=("state", "meta"))
  try:
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if not isinstance(meta, dict) or "config" not in meta:
      raise ValueError("its meta item holds no config")
  except Exception as e:
    raise DamagedCheckpoint(damaged_message(workdir, step, e, steps)) from None
  finally:
    mngr.close()
  return step, meta


def damaged_message(workdir: str, step: int, e: BaseException, steps: list[int]) -> str:
  others = [s for s in steps if s != step]
  return (f"checkpoint step {step} of {workdir} is damaged ({storage_error(e)}); "
          + (f"its other steps: {others} (--step N)" if others else "it has no other step"))


def leaf_shapes(tree) -> dict[str, tuple]:
  """Dotted leaf name -> shape, named as orbax names a saved leaf ("opt_state.1.0.count")."""
  def name(k):
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  return {".".join(name(k) for k in path): tuple(x.shape)
          for path, x in jax.tree_util.tree_leaves_with_path(tree) if hasattr(x, "shape")}


def fit_problems(saved: dict, want: dict, limit: int = 3) -> list[str]:
  """How a checkpoint's leaf shapes differ from the state a config builds (at most `limit`).
  Names that share nothing mean another naming scheme: orbax's restore decides then."""
  if not saved.keys() & want.keys():
    return []
  out = [f"{k} {list(saved[k])} in the checkpoint, {list(want[k])} in this config"
         for k in sorted(saved.keys() & want.keys()) if saved[k] != want[k]]
  out += [f"{k} missing from the checkpoint" for k in sorted(want.keys() - saved.keys())]
  out += [f"{k} not in this config's state" for k in sorted(saved.keys() - want.keys())]
  return out[:limit] + ([f"{len(out) - limit} more"] if len(out) > limit else [])


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
  text = text.split(_TS_DETAILS)[0].strip()   # a repr of a bound method follows: no information
  return text if len(text) <= 400 else text[:180] + " ... " + text[-220:]


_TS_DETAILS = "See full TensorStore details"


def storage_error(e: BaseException) -> str:
  """The line of a failed read / write that names the storage problem: orbax wraps
  tensorstore's error (e.g. "DATA_LOSS: ... Error decoding ...", "OUT_OF_RANGE: ... byte range
  ... is not valid") in an exception whose own text is a slice index and a repr; the innermost
  cause with a message of its own is the one to show."""
  chain, seen = [], set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    chain.append(e)
    e = e.__cause__ or e.__context__
  for x in reversed(chain):
    text = first_line(x)
    if text and not text.startswith("Encountered error while"):
      return text
  return first_line(chain[0])


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

  def read_meta(self, step: int) -> dict:
    """The meta item of `step` (data position, config); raises what orbax raises."""
    meta = self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if not isinstance(meta, dict) or "config" not in meta or "step" not in meta:
      raise ValueError("its meta item holds no step / config")
    return meta

  def saved_shapes(self, step: int) -> dict[str, tuple]:
    """Leaf shapes of the state saved at `step`, read from its metadata (no array is read)."""
    md = ocp.StandardCheckpointer().metadata(os.path.join(self.directory, str(step), "state"))
    return leaf_shapes(getattr(md, "item_metadata", md))

  def move_aside(self, step: int) -> str:
    """Moves the directory of a damaged `step` to WORKDIR/damaged_checkpoints/<step>[.n] (never
    deleted: it may be repairable, and it is evidence); returns where it went."""
    root = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)
    os.makedirs(root, exist_ok=True)
    dst, n = os.path.join(root, str(step)), 0
    while os.path.exists(dst):
      n += 1
      dst = os.path.join(root, f"{step}.{n}")
    shutil.move(os.path.join(self.directory, str(step)), dst)
    self.reload()
    return dst

  def reload(self) -> None:
    """Forgets the manager's cached step list (a step was moved or another process changed it)."""
    self.mngr.reload()

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
