"""Batch-size scaling of a recipe (d2v_jax/scaling.py): the closed forms, the EMA invariance it
exists for, and what the command line gets."""

from __future__ import annotations

import math

import numpy as np
import pytest
from absl import flags

from d2v_jax import config as config_lib, ema, resolve


def _cfg(*args, spec="configs/text.py:variant=base"):
  cfg = config_lib.parse_argv(["prog", "--config", spec, *args], flags.FlagValues()).config
  cfg.model.vocab_size = 50265
  resolve.resolve(cfg)
  return cfg


def test_closed_forms_at_4x(capsys):
  cfg = _cfg("--config.batch_size=1024")
  assert cfg.scaling.reference_batch == 256
  assert cfg.optim.lr == pytest.approx(2e-4 * 2)                # sqrt(4)
  assert cfg.teacher.tau_start == pytest.approx(0.999 ** 4)
  assert cfg.teacher.tau_end == pytest.approx(0.9999 ** 4)
  assert (cfg.teacher.anneal_steps, cfg.optim.warmup_steps, cfg.total_steps,
          cfg.checkpoint_every) == (75_000, 2_500, 250_000, 2_500)
  r = cfg.scaling.recipe   # config.json keeps the recipe's values beside the scaled ones
  assert (r.lr, r.tau_start, r.total_steps) == (2e-4, 0.999, 1_000_000)
  line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("batch 1024")]
  assert len(line) == 1 and "optim.lr 0.0002 -> 0.0004" in line[0]
  resolve.resolve(cfg)         # once: a second resolve leaves it as it is
  assert cfg.optim.lr == pytest.approx(4e-4) and cfg.total_steps == 250_000


def test_linear_rule_none_rule_and_given_keys():
  lin = _cfg("--config.batch_size=64", "--config.scaling.lr=linear")
  assert lin.optim.lr == pytest.approx(2e-4 / 4) and lin.total_steps == 4_000_000
  off = _cfg("--config.batch_size=64", "--config.scaling.lr=none", "--config.scaling.ema=False",
             "--config.scaling.lengths=False")
  assert (off.optim.lr, off.teacher.tau_start, off.total_steps) == (2e-4, 0.999, 1_000_000)
  given = _cfg("--config.batch_size=1024", "--config.optim.lr=1e-3", "--config.total_steps=77")
  assert (given.optim.lr, given.total_steps) == (1e-3, 77)      # the user's choice stands
  assert given.optim.warmup_steps == 2_500                      # the rest is scaled
  same = _cfg("--config.batch_size=256")
  assert same.optim.lr == 2e-4 and same.scaling.recipe.lr is None


def test_batch_set_in_code_is_taken_as_is():
  cfg = config_lib.load_file("configs/text.py:variant=base")
  cfg.model.vocab_size, cfg.batch_size = 50265, 1024
  resolve.resolve(cfg)
  assert cfg.optim.lr == 2e-4 and cfg.total_steps == 1_000_000


def test_teacher_forgets_the_same_examples_at_b_and_4b():
  """The weight an EMA teacher still gives to its state of N examples ago, with the recipe's
  annealed schedule at batch B and the scaled one at 4B: prod over steps of tau(step)."""
  ref = _cfg(spec="configs/text.py:variant=base")
  big = _cfg("--config.batch_size=1024")
  examples = 600_000 * 256   # past the anneal (300k steps at B)

  def memory(cfg):
    steps = examples // cfg.batch_size
    taus = np.asarray(ema.tau_from_config(np.arange(1, steps + 1), cfg.teacher), np.float64)
    return np.exp(np.log(taus).sum())
  m_ref, m_big = memory(ref), memory(big)
  # Constant tau: exactly equal (tau^k per step, 1/k the steps). During the linear anneal the
  # scaled schedule is tau(t)^k on a grid k times coarser: equal to O(1/steps).
  assert math.isclose(np.log(m_big), np.log(m_ref), rel_tol=1e-3), (np.log(m_big), np.log(m_ref))
  # without the EMA rule the teacher at 4B would remember 4x as many examples
  off = _cfg("--config.batch_size=1024", "--config.scaling.ema=False")
  assert np.log(memory(off)) / np.log(m_ref) == pytest.approx(0.25, rel=1e-2)


def test_bad_rule_is_one_line():
  with pytest.raises(config_lib.ConfigError, match="scaling.lr='cubic' must be one of"):
    _cfg("--config.batch_size=512", "--config.scaling.lr=cubic")
