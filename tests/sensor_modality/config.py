"""The sensor modality's config (tests/sensor_modality/__init__.py).

  python -m d2v_jax.train --config tests/sensor_modality/config.py --workdir RUN \
      --config.data.path='recordings/*.npy'           (PYTHONPATH=tests)
"""

from __future__ import annotations

import ml_collections

from d2v_jax import recipe


def get_config(arg: str | None = None):
  del arg
  c = recipe.base_config("sensor_modality")
  c.model = ml_collections.ConfigDict(dict(
      patch=4, channels=3,
      encoder=recipe.encoder(2, 32, 2, 64, pre_ln=True, final_norm=True, dropout=0.0,
                             attention_dropout=0.0)))
  c.data = ml_collections.ConfigDict(dict(path="", window=64, mask_prob=0.5))
  recipe.targets_and_loss(c, top_k=2, layer_output="ffn", layer_norm="instance",
                          final_norm="none", beta=0.0, scale=None, reduce_dims="sum")
  recipe.tau_schedule(c, 0.99, 0.999, 20)
  recipe.runlocal(c, steps=6, batch=8)
  c.checkpoint_every = 3
  c.log_every = 1
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 2
  return c
