"""One data2vec training step of ours next to fairseq's own, on the same weights and masks.

A tiny fairseq model with random weights (dropout 0) is built from fairseq's own config
classes; its state dict goes through our importer (d2v_jax/fairseq_io) and our config takes
the checkpoint's settings (arch.settings), so the import is part of what is tested. Both then
see the same batch and the same masks (fairseq's `precomputed_mask` in 2.0, `mask_indices` /
<mask> tokens in 1.0). `compare` measures teacher targets, predictions at the masked
positions, the loss, the gradients of every parameter (through our exporter, so fairseq names
index both), and the teacher after one EMA update at the same tau.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from d2v_jax import build as build_lib, config as config_lib, objectives, step as step_lib
from d2v_jax.fairseq_io import arch, convert, layouts
from d2v_jax.hf import common as hf_common


@dataclasses.dataclass
class Side:
  """What one implementation computed on the batch (numpy, fairseq names for trees)."""
  targets: np.ndarray      # [B, T, D] teacher targets (after the final norm)
  pred: np.ndarray         # [n_masked, D] predictions at the masked positions, in row order
  loss: float
  grads: dict              # fairseq weight name -> gradient


def torch_state(model, skip=("_ema",)) -> dict:
  """A fairseq model's state dict as numpy, the EMA dict(s) kept as nested dicts."""
  out = {}
  for k, v in model.state_dict().items():
    if k.split(".")[-1] in skip or k in skip:
      out[k] = {kk: vv.detach().float().numpy() for kk, vv in v.items()}
    elif v.is_floating_point():
      out[k] = v.detach().float().numpy()
  return out


def our_config(spec: str, model_cfg: dict, state: dict, **overrides):
  """configs/<m>.py:spec with the checkpoint's settings (the importer's) and `overrides`."""
  layout = layouts.layout(model_cfg)
  cfg = config_lib.load_file(spec)
  for key, value in arch.settings(model_cfg, state, layout).items():
    config_lib.set_path(cfg, key, value)
  for key, value in overrides.items():
    config_lib.set_path(cfg, key, value)
  return cfg, layout


def build_ours(cfg, layout, state: dict):
  """(built, TrainState) on one device with the imported student and EMA teacher."""
  built = build_lib.build(cfg, devices=jax.devices()[:1])
  shapes = hf_common.our_shapes(cfg)
  scan = bool(cfg.model.encoder.scan)
  params = convert.from_state(layout, state, shapes, scan)
  teacher = convert.teacher_from_state(layout, state, shapes, scan, cfg.teacher.ema_subtrees)
  st = built.init(cfg.seed)
  put = lambda ref, x: jnp.asarray(np.asarray(x, np.float32)).astype(ref.dtype)
  st = st.replace(params=jax.tree_util.tree_map(put, st.params, params),
                  teacher=jax.tree_util.tree_map(put, st.teacher, teacher))
  return built, st


def our_run(cfg, layout, state: dict):
  """Our model of cfg with the imported weights, a batch with our real masks (two examples,
  seed 3), and our side of the row on it: (built, TrainState, batch, Side)."""
  built, st = build_ours(cfg, layout, state)
  batch = built.modality.data.synthetic_batch(cfg, 2, seed=3)
  return built, st, batch, our_side(built, st, batch, layout)


def our_side(built, state, batch: dict, layout) -> Side:
  cfg, model = built.cfg, built.model
  b = jax.tree_util.tree_map(jnp.asarray, batch)
  fwd = objectives.get(cfg)
  rng = jax.random.PRNGKey(0)

  def loss_fn(p):
    return fwd(model, p, state.teacher, b, rng, cfg)
  (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state.params)
  y, _ = jax.jit(lambda p, t: step_lib.teacher_targets(model, p, t, b, cfg))(state.params, state.teacher)
  mask = np.asarray(aux.mask)
  pred = np.asarray(aux.pred)[mask]
  return Side(targets=np.asarray(y), pred=pred, loss=float(loss),
              grads=convert.to_state(layout, jax.device_get(grads), fold=False))


def torch_grads(model, loss, names) -> dict:
  loss.backward()
  params = dict(model.named_parameters())
  return {n: params[n].grad.detach().numpy().copy() for n in names
          if n in params and params[n].grad is not None}


def rel_err(a, b, floor: float = 1e-30) -> float:
  """max |a - b| / max(max |b|, floor)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), floor))


def compare(ours: Side, ref: Side) -> dict:
  """Measured errors of one row: max abs for targets / predictions / loss, max relative
  gradient error over all parameters fairseq trains (and the worst one's name). A gradient
  is relative to its own largest entry, floored at 1e-3 of the model's largest gradient
  entry: the attention key bias has an analytically zero gradient (softmax ignores a shift
  shared by all keys), so both sides hold float noise there (~1e-9) that only an absolute
  scale can compare."""
  floor = 1e-3 * max(float(np.abs(g).max()) for g in ref.grads.values())
  grad_errs = {n: rel_err(ours.grads[n], g, floor) for n, g in ref.grads.items() if n in ours.grads}
  worst = max(grad_errs, key=grad_errs.get)
  return {"targets": float(np.abs(ours.targets - ref.targets).max()),
          "pred": float(np.abs(ours.pred - ref.pred).max()),
          "loss": abs(ours.loss - ref.loss),
          "grad": grad_errs[worst], "grad_worst": worst, "n_grads": len(grad_errs),
          "missing_grads": sorted(set(ref.grads) - set(ours.grads))}


def fairseq_v2_side(model, mode: str, source, batch: dict, state: dict, torch) -> Side:
  """fairseq's data2vec 2.0 forward (train mode) on `source` with our masks as its
  precomputed_mask: targets from make_targets, the decoder's output at the masked positions,
  the loss as fairseq's trainer divides it, and every parameter's gradient."""
  model.train()
  captured, dec_out = {}, []
  make_targets = model.make_targets
  model.make_targets = lambda y, k: captured.setdefault("y", make_targets(y, k))
  model.modality_encoders[mode].decoder.register_forward_hook(lambda m, i, o: dec_out.append(o))
  mask = torch.from_numpy(batch["mask"].reshape(-1, batch["mask"].shape[-1]))
  loss = fairseq_loss(model(source, precomputed_mask=mask))
  return Side(targets=captured["y"].detach().numpy(), pred=dec_out[0][mask].detach().numpy(),
              loss=float(loss), grads=torch_grads(model, loss, list(state)))


def fairseq_loss(res):
  """fairseq's loss as its trainer sees it: the summed losses over sample_size."""
  return sum(v.sum() for v in res["losses"].values()) / res["sample_size"]


def ema_after_one_step(model, ema, layout, built, state, batch: dict, torch):
  """Our full step once, our updated student loaded into fairseq, fairseq's EMA step at update
  1: (max error over the EMA entries both hold, how many, fairseq's EMA dict, ours)."""
  new_state, tau = one_step(built, state, batch)
  load_student(model, layout, new_state.params, torch)
  model.set_num_updates(1)
  assert abs(ema.get_decay() - tau) < 1e-7
  fs_ema = {k: v.numpy() for k, v in ema.fp32_params.items()}
  ours = teacher_after(layout, new_state)
  err, n = ema_error(fs_ema, ours)
  return err, n, fs_ema, ours


def one_step(built, state, batch: dict):
  """Our whole train step once (optimizer, then EMA): (new state on host, tau used)."""
  b = build_lib.to_global(batch, built.batch_shardings)
  new, metrics = built.step(state, b)
  return jax.device_get(new), float(metrics["tau"])


def teacher_after(layout, new_state) -> dict:
  """Our teacher after the step as fairseq's EMA dict."""
  return convert.teacher_to_state(layout, new_state.params, new_state.teacher)


def load_student(model, layout, params, torch) -> None:
  """Our params into a fairseq student (every parameter it has; its EMA untouched)."""
  state = convert.to_state(layout, params)
  own = dict(model.named_parameters())
  with torch.no_grad():
    for name, value in state.items():
      if name in own:
        own[name].copy_(torch.from_numpy(np.ascontiguousarray(value)))


def ema_error(fs_ema: dict, ours: dict) -> tuple[float, int]:
  """Max abs difference over the EMA entries both hold, and how many that is."""
  common = [k for k in ours if k in fs_ema]
  return max(float(np.abs(np.asarray(fs_ema[k]) - ours[k]).max()) for k in common), len(common)
