"""The benchmark suite: every sub-benchmark's --quick table, and equal work in the PyTorch
reference (same loss as our step on the same weights, batch and masks)."""

import json
import os

import jax
import numpy as np
import pytest

from d2v_jax.bench import __main__ as dispatcher
from d2v_jax import flops
from d2v_jax.bench import profile, setups

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, *argv) -> dict:
  """Runs `python -m d2v_jax.bench ARGV --out tmp` in-process; returns the JSON it wrote."""
  name = argv[0]
  assert dispatcher.main([*argv, "--out", str(tmp_path)]) == 0
  with open(tmp_path / f"{name}.json") as f:
    payload = json.load(f)
  table = (tmp_path / f"{name}.md").read_text().splitlines()
  assert payload["benchmark"] == name and payload["rows"]
  assert payload["machine"]["cpus"] >= 1 and payload["machine"]["cpu"]
  assert len(table) == 2 + len(payload["rows"])          # header, rule, one line per row
  return payload


def _cols(row: dict, names: list[str]) -> None:
  missing = [c for c in names if c not in row]
  assert not missing, f"row lacks {missing}: {sorted(row)}"


def test_step_quick_table(tmp_path):
  p = _run(tmp_path, "step", "--quick")
  (row,) = p["rows"]
  _cols(row, ["ours ms", "torch ms", "ours/torch", "ours cpu ms", "torch cpu ms", "loss ours",
              "loss torch"])
  assert (row["modality"], row["size"], row["dtype"], row["batch"]) == ("text", "tiny", "float32",
                                                                     setups.QUICK_BATCH)
  assert row["ours/torch"] == pytest.approx(row["ours ms"] / row["torch ms"])
  assert len(row["ours wall s"]) == len(row["torch wall s"]) == p["reps"] == 2
  # Dropout differs between the two, so the first losses agree only loosely here
  # (test_torch_reference_matches_our_step checks them exactly with dropout off).
  assert row["loss ours"] == pytest.approx(row["loss torch"], rel=0.05)


def test_mfu_quick_table(tmp_path):
  p = _run(tmp_path, "mfu", "--quick")
  (row,) = p["rows"]
  _cols(row, ["GFLOP analytic", "GFLOP xla", "step ms", "peak GFLOP/s", "MFU %", "MFU % xla"])
  s = setups.make("text", "tiny", batch_size=setups.QUICK_BATCH, overrides=setups.QUICK)
  assert row["GFLOP analytic"] == pytest.approx(flops.model_flops(s.built, s.global_batch)[0]["total"] / 1e9)
  # XLA counts every op; the analytic count only matmuls: same order of magnitude.
  assert 0.8 < row["GFLOP xla"] / row["GFLOP analytic"] < 3
  assert row["MFU %"] == pytest.approx(100 * row["GFLOP/s"] / row["peak GFLOP/s"])


def test_analytic_flops_by_hand():
  """text tiny, batch 4 x 128 tokens: 2 layers x (4 D^2 + 2 D F) + attention, 2-layer head;
  the embedding lookup is no matmul (d2v_jax/flops.py, the one model of compile and mfu)."""
  s = setups.make("text", "tiny", batch_size=4)
  n, t, d, f = 4 * 128, 128, 64, 256
  layer = 2 * n * (4 * d * d + 2 * d * f) + 2 * 2 * n * t * d
  head = 2 * n * (d * 2 * d + 2 * d * d)
  model, seq_len = flops.model_flops(s.built, s.global_batch)
  assert seq_len == t
  assert model["total"] == pytest.approx(2 * layer + 3 * (2 * layer + head))


def test_compile_quick_table(tmp_path):
  p = _run(tmp_path, "compile", "--quick")
  (row,) = p["rows"]
  _cols(row, ["lower s", "compile s", "total s", "hlo instructions"])
  assert row["total s"] == pytest.approx(row["lower s"] + row["compile s"])
  assert row["compile s"] > 0 and row["hlo instructions"] > 100


def test_input_quick_table(tmp_path, kjv_path):
  p = _run(tmp_path, "input", "--quick", "--workdir", str(tmp_path / "work"))
  assert [r["cores"].split()[0] for r in p["rows"]] == ["1", "all"]
  for row in p["rows"]:
    _cols(row, ["examples/s", "tokens/s", "ms/batch", "step examples/s", "input/step"])
    assert row["batch"] == setups.QUICK_BATCH
    assert row["positions"] == setups.QUICK["data.block_size"]
    assert row["input/step"] == pytest.approx(row["examples/s"] / row["step examples/s"])


def test_memory_quick_table(tmp_path):
  p = _run(tmp_path, "memory", "--quick", "--steps", "2")
  base, text = p["rows"]
  assert base["modality"] == "(imports only)" and text["modality"] == "text"
  assert text["exit"] == 0 and base["exit"] == 0
  # a training process holds more than the bare imports
  assert text["peak RSS MB"] > base["peak RSS MB"] > 100
  assert text["over imports MB"] == pytest.approx(text["peak RSS MB"] - base["peak RSS MB"])


def test_profile_classifies_hlo_instructions():
  """The profile's HLO parser and classifier on a small compiled function."""
  import flax.linen as nn
  import jax.numpy as jnp

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
      with jax.named_scope("teacher"):
        y = nn.LayerNorm(name="attn_norm")(nn.Dense(16, name="fc1")(x))
      return jnp.sum(jax.nn.gelu(y, approximate=False))

  m = Tiny()
  x = jnp.ones((8, 16))
  params = m.init(jax.random.PRNGKey(0), x)
  text = jax.jit(jax.grad(lambda p: m.apply(p, x))).lower(params).compile().as_text()
  instr = profile.instructions(text)
  assert instr and all(isinstance(op, str) for op, _ in instr.values())
  kinds = {profile.kind(op, name, n) for n, (op, name) in instr.items()}
  assert "matmul" in kinds
  assert profile.phase("jit(f)/transpose(jvp(Data2Vec))/encoder/fc1") == "student bwd"
  assert profile.phase("jit(f)/jvp(Data2Vec)/encoder/fc1") == "student fwd"
  assert profile.phase("jit(f)/teacher/Data2Vec/encoder") == "teacher"
  assert profile.kind("fusion", "x/attention/Dropout_0/jit(_bernoulli)/threefry", "f") == "dropout-rng"
  assert profile.kind("dot", "x/attention/bqhd,bkhd->bhqk/dot_general", "dot.1") == "attention matmul"
  assert profile.kind("fusion", "x/block/attn_norm/mul", "f") == "layernorm"


def _no_dropout(cfg) -> None:
  e = cfg.model.encoder
  e.dropout = e.attention_dropout = e.activation_dropout = 0.0
  e.drop_path = e.layerdrop = 0.0
  for key in ("embed_dropout", "feature_dropout"):
    if key in cfg.model:
      cfg.model[key] = 0.0


# The PyTorch reference and our step after STEPS steps that change the model: no warm-up (the
# first update is at the peak lr 1e-3, then cosine), weight decay 0.1, a global-norm clip that
# bites on some steps (CLIP: between the step's measured gradient norms), and tau annealed
# 0.5 -> 0.9 over 4 updates (so the EMA's update count matters). Tolerances, measured float32
# gaps (text / vision / audio) and the smallest effect each must still see:
STEPS = 6
OVERRIDES = {"optim.schedule": "cosine", "optim.warmup_steps": 0, "optim.lr": 1e-3,
             "optim.init_lr_scale": 0.0, "optim.final_lr_scale": 0.0, "total_steps": 8,
             "optim.weight_decay": 0.1, "teacher.tau_start": 0.5, "teacher.tau_end": 0.9,
             "teacher.anneal_steps": 4}
# grad norms measured over the 6 steps: text 1.7 -> 3.5, vision 0.072 -> 0.025, audio 1.86 -> 1.09
CLIP = {"text": 2.5, "vision": 0.04, "audio": 1.2}
# losses (relative): measured <= 3e-7.
PARITY_RTOL = 1e-5
# params (absolute): measured <= 4.8e-6 (audio head after Adam); weight decay 0.1 on a
# LayerNorm scale (1.0) moves it by ~5e-4 over the 6 steps: 25x the tolerance.
PARAM_ATOL = 2e-5
# teacher (absolute): measured <= 7e-7; tau one update off (0.1 per step) moves it ~1e-4.
TEACHER_ATOL = 5e-6
# Adam moments: |ours - torch| <= MOMENT_RTOL x the leaf's largest entry + MOMENT_FLOOR x the
# tree's largest (key biases get no gradient at all: both sides hold rounding noise there);
# measured <= 4e-5 of the leaf's largest. Betas (0, 0.5) change them by O(1); the clip
# scales the gradients of >= 2 steps by <= 0.85: >= 5 %.
MOMENT_RTOL, MOMENT_FLOOR = 1e-3, 1e-5


def _adam(opt_state):
  import optax
  found = [s for s in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
      if isinstance(s, optax.ScaleByAdamState)]
  assert len(found) == 1
  return found[0]


def _assert_close(ours: dict, theirs: dict, what: str, atol=None):
  assert sorted(ours) == sorted(theirs), what
  floor = MOMENT_FLOOR * max(float(np.abs(v).max()) for v in theirs.values())
  for name, want in theirs.items():
    tol = atol if atol is not None else MOMENT_RTOL * float(np.abs(want).max()) + floor
    np.testing.assert_allclose(ours[name], want, rtol=0, atol=tol, err_msg=f"{what} {name}")


@pytest.mark.parametrize("modality", ["text", "vision", "audio"])
def test_torch_reference_matches_our_step(modality):
  """Our jitted step and the PyTorch reference (HF model, torch AdamW, clip_grad_norm_, its
  own EMA), from the same weights on the same batch (dropout off), for 6 steps that change
  the model: the same losses, and leaf by leaf the same student parameters, teacher and Adam
  moments (mapped to HF names), to the tolerances above."""
  from d2v_jax import build as build_lib, ema
  from d2v_jax.bench import torch_ref
  reason = setups.available(modality)
  if reason:
    pytest.skip(f"{modality} modules not available: {reason}")
  over = {"model.encoder.num_layers": 2, **OVERRIDES, "optim.clip": CLIP[modality]}
  if modality == "text":
    over["data.block_size"] = 32
  if modality == "audio":
    # two conv layers (10/5, 3/2) on 1000 samples: 99 frames, every other row a quarter padded
    over.update({"model.conv_dims": (32, 32), "model.conv_kernels": (10, 3),
                 "model.conv_strides": (5, 2), "data.max_samples": 1000, "data.min_samples": 500})
  cfg = setups.config(modality, "tiny", batch_size=4, overrides=over)
  cfg.target.top_k = min(cfg.target.top_k, 2)
  _no_dropout(cfg)
  built = build_lib.build(cfg, devices=jax.devices()[:1])
  state = built.init(0)
  init = jax.device_get(state.params)
  batch = setups.batch(cfg, seed=3)
  ref = torch_ref.TorchData2Vec(cfg, init)
  ours, theirs, norms = [], [], []
  for _ in range(STEPS):
    state, m = built.step(state, build_lib.to_global(batch, built.batch_shardings))
    ours.append(float(m["loss"]))
    norms.append(float(m["grad_norm"]))
    theirs.append(ref.step(batch))
  np.testing.assert_allclose(theirs, ours, rtol=PARITY_RTOL)
  # positive controls: the clip bit on some steps and not on others; the model moved
  assert sum(n > cfg.optim.clip for n in norms) >= 2 and min(norms) < cfg.optim.clip, norms
  state = jax.device_get(state)
  got, want = torch_ref.as_torch_names(state.params, cfg), ref.named_state()
  start = torch_ref.as_torch_names(init, cfg)
  assert max(float(np.abs(got[k] - start[k]).max()) for k in got) > 100 * PARAM_ATOL
  _assert_close(got, want["params"], "params", PARAM_ATOL)
  teacher = torch_ref.as_torch_names(ema.teacher_params(state.params, state.teacher), cfg)
  assert want["teacher"] and max(float(np.abs(teacher[k] - start[k]).max())
                                 for k in want["teacher"]) > 20 * TEACHER_ATOL
  _assert_close({k: teacher[k] for k in want["teacher"]}, want["teacher"], "teacher", TEACHER_ATOL)
  adam = _adam(state.opt_state)
  assert int(adam.count) == STEPS
  for key in ("mu", "nu"):
    _assert_close(torch_ref.as_torch_names(getattr(adam, key), cfg), want[key], key)


def test_gpu_bench_without_a_gpu_measures_nothing_and_exits_0(tmp_path, capsys):
  """`python -m d2v_jax.bench gpu` on a machine without a GPU: one line, exit 0, no files."""
  assert dispatcher.main(["gpu", "--out", str(tmp_path)]) == 0
  # the start-up plan line (printed once per process, like every entry point's) aside
  lines = [ln for ln in capsys.readouterr().out.strip().splitlines()
           if not ln.startswith("distributed: ")]
  assert len(lines) == 1 and lines[0].startswith("no GPU: nothing measured"), lines
  assert not list(tmp_path.iterdir())


def test_gpu_bench_measurement_path_on_cpu(tmp_path):
  """The GPU benchmark's own code (numpy batches, parity check through the cuDNN path's
  logic, peak matmul, compile, timing, memory, MFU) run on CPU with text tiny, batch 2, one
  step (--cpu-smoke, a test-only flag): one xla row with every column filled."""
  p = _run(tmp_path, "gpu", "--cpu-smoke", "--modality", "text")
  (row,) = p["rows"]
  assert (row["modality"], row["attention"], row["status"]) == ("text", "xla", "ok"), row
  _cols(row, ["step ms", "examples/s", "compiled GiB", "TFLOP/step", "MFU %", "remat",
              "used (teacher / student)"])
  assert row["remat"] == "none" and row["used (teacher / student)"] == "xla / xla"
  assert row["positions"] == 32 and row["batch"] == 2
  assert row["examples/s"] == pytest.approx(2 / (row["step ms"] / 1e3))
  assert row["MFU %"] > 0 and row["compiled GiB"] > 0   # (a CPU figure: no meaning beyond that)


@pytest.mark.slow   # traces two base-size steps and compiles two tiny ones
def test_v2_quick_table(tmp_path, capsys):
  """`bench v2 --quick --modality text`: the traced base-size FLOP rows (v1, v2) and the timed
  1-layer rows; FLOPs per masked token as docs/v2.md states (text: v2 2.6x fewer than v1)."""
  p = _run(tmp_path, "v2", "--quick", "--modality", "text")
  rows = p["rows"]
  assert [(r["objective"], r["size"]) for r in rows] == [("v1", "base"), ("v1", "tiny"),
                                                         ("v2", "base"), ("v2", "tiny")]
  for r in rows:
    assert r["GFLOP/view"] * r["views"] == pytest.approx(r["GFLOP/example"])
    assert r["MFLOP/masked token"] == pytest.approx(
        1e3 * r["GFLOP/example"] / r["masked/example"])
  v1, v2 = rows[0], rows[2]
  assert v1["views"] == 1 and v2["views"] > 1 and v2["masked/example"] > v1["masked/example"]
  assert rows[1]["ms/step"] > 0 and rows[3]["us/masked token"] > 0
  assert p["ratios"]["text"] == pytest.approx(v1["flops_per_masked"] / v2["flops_per_masked"])
  assert round(p["ratios"]["text"], 1) == 2.6, p["ratios"]
  assert "text: v2 uses 2.6x fewer FLOPs per masked token than v1" in capsys.readouterr().out
