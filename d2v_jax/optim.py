"""optax factory: Adam(W) with warmup + cosine / tri-stage / constant, clipping, decay masks."""

from __future__ import annotations

import jax
import optax


def tri_stage_lengths(o, total_steps: int) -> tuple[int, int, int]:
  """(warm-up, hold, decay) steps of the tri_stage schedule: optim.stage_ratios x total_steps,
  warm-up and decay at least 1 step."""
  w, h, d = (int(r * total_steps) for r in o.stage_ratios)
  return max(w, 1), h, max(d, 1)


def schedule(o, total_steps: int) -> optax.Schedule:
  peak = o.lr
  if o.schedule == "cosine":
    warmup = min(o.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=peak * o.init_lr_scale, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=peak * o.final_lr_scale)
  if o.schedule == "tri_stage":
    # fairseq tri_stage: linear warmup, hold, exponential decay to final_lr_scale * lr.
    w, h, d = tri_stage_lengths(o, total_steps)
    final = max(o.final_lr_scale, 1e-8)
    return optax.join_schedules(
        [optax.linear_schedule(peak * o.init_lr_scale, peak, w),
         optax.constant_schedule(peak),
         optax.exponential_decay(peak, d, final, end_value=peak * final)],
        boundaries=[w, w + h])
  if o.schedule == "constant":
    return optax.constant_schedule(peak)
  raise ValueError(f"optim.schedule={o.schedule!r}: use cosine, tri_stage or constant")


def decay_mask(o):
  """Which leaves get weight decay: all (fairseq Adam) or only >= 2-D weights minus names in
  optim.no_decay (BEiT's optim_factory: no decay on 1-D params, biases and the model's skip
  list), except names in optim.decay, which are always decayed (BEiT decays its [1, 1, D]
  mask token and its 2-D relative position table, which are 1-D / named *bias here)."""
  no_decay = tuple(o.no_decay)
  always = tuple(o.decay)

  def mask(params):
    def keep(path, x):
      name = jax.tree_util.keystr(path)
      if any(n in name for n in always):
        return True
      if any(n in name for n in no_decay):
        return False
      # Scanned blocks carry a leading layer axis: a stacked bias is still a 1-D parameter.
      ndim = x.ndim - (1 if "['layers']" in name else 0)
      return True if o.decay_1d else ndim >= 2
    return jax.tree_util.tree_map_with_path(keep, params)
  return mask


def make(o, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  lr = schedule(o, total_steps)
  chain = []
  if o.clip > 0:
    chain.append(optax.clip_by_global_norm(o.clip))
  chain.append(optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                           mask=decay_mask(o)))
  return optax.chain(*chain), lr
