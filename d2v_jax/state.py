"""TrainState: everything a step reads and writes, as one pytree (checkpointed whole)."""

from __future__ import annotations

import flax
import jax


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar: number of updates done
  params: dict           # student parameters (float32 master weights)
  teacher: dict          # EMA copies of params[k] for k in config.teacher.ema_subtrees (float32)
  opt_state: tuple       # optax state
  rng: jax.Array         # base PRNG key; step keys are fold_in(rng, step), so resume is exact
