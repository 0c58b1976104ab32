"""orbax checkpoints of the whole TrainState plus a JSON `meta` item (data position, config).

Saves are asynchronous (training continues while the previous step is written); every
process takes part (orbax writes each shard from the process that owns it). Restore asks
for the abstract state with the *current* shardings, so a run written on N devices
restores on M devices.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class NoCheckpoint(FileNotFoundError):
  pass


def manager(workdir: str, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=async_save)
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
