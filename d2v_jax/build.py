"""From a resolved config to everything a step needs: model, optimizer, mesh, shardings,
the sharded init and the jitted step. Shared by train, compile, bench and tests so they all
build exactly the same program."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d2v_jax import ema, optim, resolve, sharding, step as step_lib, validate
from d2v_jax.modality import Modality, load as load_modality
from d2v_jax.models import cpu_ops, data2vec
from d2v_jax.state import TrainState


@dataclasses.dataclass
class Built:
  cfg: Any
  modality: Any
  model: Any
  tx: Any
  lr_fn: Callable
  mesh: jax.sharding.Mesh
  abstract_state: TrainState
  state_shardings: TrainState
  batch_shardings: dict
  init: Callable            # init(seed:int) -> sharded TrainState
  step: step_lib.MeshStep   # jitted step(state, batch) -> (state, metrics); .lower(...)
  step_fn: Callable         # the un-jitted pure step


def build(cfg, *, mesh=None, devices=None, mod: Modality | None = None) -> Built:
  """cfg: resolved by resolve.resolve (frozen: taken as it is), or made in code with its data
  keys set (e.g. vocab_size): then its settings are resolved and checked here. `mod`: the
  modality, when the caller loaded it."""
  if not resolve.frozen(cfg):
    mod = resolve.settings(cfg, mod)
    validate.validate(cfg, mod)
  mod = mod or load_modality(cfg.modality)
  mesh = mesh or sharding.make_mesh(cfg.mesh, devices)
  # The model is built for the mesh's platform (attention kernels, CPU-only speed-ups): an
  # ahead-of-time compile for TPU devices from a CPU host gets the TPU program.
  platform = cpu_ops.platform_of(mesh.devices.flat[0])
  if platform == "cpu":
    cpu_ops.fast_threefry()   # the same random bits, a faster CPU kernel (models/cpu_ops.py)
  model = data2vec.build(cfg, mod.model.build(cfg), platform)
  tx, lr_fn = optim.make(cfg.optim, cfg.total_steps)
  init_batch = jax.tree_util.tree_map(jnp.asarray, mod.data.example_batch(cfg, 1))

  v2 = cfg.objective == "v2"
  fixup = getattr(mod.model, "init_fixup", None)

  def init_boxed(rng):
    k_params, k_drop, k_state = jax.random.split(rng, 3)
    k_fix = jax.random.fold_in(rng, 1)
    variables = model.init({"params": k_params, "dropout": k_drop}, init_batch, v2,
                           method=model.init_all)
    params = variables["params"]
    if fixup is not None:  # a modality's own initialisation (vision: data2vec_vision's)
      is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
      fixed = fixup(nn.meta.unbox(params), k_fix, cfg)
      params = jax.tree_util.tree_map(lambda box, v: box.replace_boxed(v) if is_box(box) else v,
                                      params, fixed, is_leaf=is_box)
    teacher = ema.teacher_view(params, cfg.teacher.ema_subtrees)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      teacher=jax.tree_util.tree_map(lambda x: x, teacher),
                      opt_state=tx.init(params), rng=k_state)

  rng0 = jax.random.PRNGKey(0)
  with nn.logical_axis_rules(sharding.RULES):
    boxed = jax.eval_shape(init_boxed, rng0)
    state_sh = sharding.shardings_for(boxed, mesh)
  abstract = nn.meta.unbox(boxed)

  def init_unboxed(rng):
    with nn.logical_axis_rules(sharding.RULES):
      return nn.meta.unbox(init_boxed(rng))

  init_jit = jax.jit(init_unboxed, out_shardings=state_sh)

  def init(seed: int) -> TrainState:
    with jax.set_mesh(mesh):
      return init_jit(jax.random.PRNGKey(seed))

  example = mod.data.example_batch(cfg, max(cfg.batch_size, 1))
  batch_sh = jax.tree_util.tree_map(lambda _: sharding.batch_sharding(mesh), example)
  fn = step_lib.bind(model, tx, lr_fn, cfg)
  return Built(cfg=cfg, modality=mod, model=model, tx=tx, lr_fn=lr_fn, mesh=mesh,
               abstract_state=abstract, state_shardings=state_sh, batch_shardings=batch_sh,
               init=init, step=step_lib.jit_step(fn, mesh, state_sh, batch_sh, sharding.RULES),
               step_fn=fn)


def abstract_batch(cfg, modality, batch_shardings) -> dict:
  """ShapeDtypeStructs of one global batch (for AOT lowering)."""
  ex = modality.data.example_batch(cfg, cfg.batch_size)
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=s),
                                ex, batch_shardings)


def to_global(local_batch: dict, batch_shardings: dict) -> dict:
  """Per-process numpy batch -> global jax.Arrays sharded over the batch axes."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)), local_batch, batch_shardings)
