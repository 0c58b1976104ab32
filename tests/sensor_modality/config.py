"""The sensor modality's config (tests/sensor_modality/__init__.py).

  python -m d2v_jax.train --config tests/sensor_modality/config.py --workdir RUN \
      --config.data.path='recordings/*.npy'           (PYTHONPATH=tests)
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs"))

import ml_collections  # noqa: E402

import common  # noqa: E402


def get_config(arg: str | None = None):
  del arg
  c = common.base_config("sensor_modality")
  c.model = ml_collections.ConfigDict(dict(
      patch=4, channels=3,
      encoder=common.encoder(2, 32, 2, 64, pre_ln=True, final_norm=True, dropout=0.0,
                             attention_dropout=0.0)))
  c.data = ml_collections.ConfigDict(dict(path="", window=64, mask_prob=0.5))
  common.targets_and_loss(c, top_k=2, layer_output="ffn", layer_norm="instance",
                          final_norm="none", beta=0.0, scale=None, reduce_dims="sum")
  common.tau_schedule(c, 0.99, 0.999, 20)
  common.runlocal(c, steps=6, batch=8)
  c.checkpoint_every = 3
  c.log_every = 1
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 2
  return c
