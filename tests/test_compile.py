"""AOT compile of the real train step for TPU topologies (libtpu, no TPU) and its CPU fallback.

The TPU tests need libtpu (requirements-tpu.txt) and are skipped with that reason without it;
the CPU-fallback tests always run.
"""

import importlib.util
import json
import re

import pytest

from d2v_jax import aot, batch_search, compile as C, flops, scale_table
from step_utils import tiny_text_config

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -r requirements-tpu.txt)")

# Wide enough (hidden 256, mlp 1024) that matmuls are > 90 % of the step's FLOPs; with
# hidden 64 GELU / softmax / LayerNorm / Adam add ~20 %.
WIDE = {"model.encoder.hidden": 256, "model.encoder.mlp_dim": 1024, "model.encoder.heads": 4,
        "data.block_size": 32, "batch_size": 16, "model.encoder.dropout": 0.0,
        "model.encoder.attention_dropout": 0.0, "model.embed_dropout": 0.0,
        # XLA attention: on TPU, auto would take the Pallas kernel, which pads these 32
        # positions to its 128-tile (4x the attention FLOPs the analytic count has)
        "model.encoder.attention": "xla"}


def test_topology_names():
  cases = {"v5e-8": ((2, 4), 8, "v5e:2x4"), "v5litepod-16": ((4, 4), 16, "v5e:4x4"),
           "v4-8": ((2, 2, 1), 4, "v4:2x2x1"), "v5p-16": ((2, 2, 2), 8, "v5:2x2x2"),
           "v6e-8": ((2, 4), 8, "v6e:2x4"), "v5e:2x2": ((2, 2), 4, "v5e:2x2"),
           "v4:2x2x2": ((2, 2, 2), 8, "v4:2x2x2")}
  for name, (shape, n, lib) in cases.items():
    t = C.parse_topology(name)
    assert (t.shape, t.num_devices, t.libtpu_name) == (shape, n, lib), name
  assert C.parse_topology("v5e-16", num_slices=2).num_devices == 32
  with pytest.raises(ValueError, match="unknown TPU generation 'v9'"):
    C.parse_topology("v9-8")
  with pytest.raises(ValueError, match="no standard slice with 3 chips"):
    C.parse_topology("v5e-3")
  with pytest.raises(ValueError, match="N must be even"):
    C.parse_topology("v4-9")


def test_analytic_flops_hand_count():
  """Text tiny (2 layers, hidden 64, mlp 256, 2-layer x2 head), 32 x 64 tokens. Per token:
  a block's forward is 8*64^2 + 4*64*256 + 4*64*64 = 114688, the head 8*64^2 = 32768;
  teacher 2 blocks, student 2 blocks + head, backward 2x the student:
  2048 * (229376 + 3 * 262144) = 2080374784."""
  cfg = tiny_text_config()
  f = flops.analytic_flops(cfg, batch=32, seq_len=64)
  assert f["teacher_fwd"] == 2048 * 229376
  assert f["student_bwd"] == 2 * f["student_fwd"] == 2 * 2048 * 262144
  assert f["total"] == 2080374784


def _check_honest_lines(text: str):
  """Memory is the compiler's; the time is a labelled lower bound with what bounds it; no MFU
  (a measured figure) and no unlabelled estimate."""
  assert "(compiler-exact)" in text
  assert "roofline LOWER BOUND from the compiler's counts, not a measurement" in text
  assert re.search(r"step >= [0-9.]+ ms, bound by (compute|HBM bytes)", text), text
  assert "compiled" in text and "analytic" in text
  assert "MFU" not in text and "estimate" not in text.lower()


def _check_figures(r: aot.Report, n_devices: int):
  mem = r.memory
  assert mem["argument"] > 0 and mem["temp"] > 0 and mem["code"] >= 0  # CPU reports no code size
  # Arguments hold the whole state shard (params + teacher + optimizer) and the batch.
  assert mem["argument"] >= sum(r.state_bytes.values())
  assert mem["total"] == mem["argument"] + mem["output"] - mem["alias"] + mem["temp"] + mem["code"]
  assert r.fits and r.num_devices == n_devices
  # The traced step's matmuls are the analytic count (same formula, other source) plus the
  # step's health metrics (d2v_jax/health.py: a d x d feature covariance, +1.8 % here).
  assert r.model_flops <= r.traced_matmul_flops <= 1.02 * r.model_flops
  # XLA's FLOPs (loop bodies scaled) agree with the analytic count within 10 %.
  per_device = r.model_flops / n_devices
  assert 1.0 <= r.flops_per_device / per_device < 1.10, (r.flops_per_device, per_device)
  assert r.xla_flops_raw <= r.flops_per_device
  # The roofline bound: the larger of compiled FLOPs at peak and bytes at HBM bandwidth.
  assert r.compute_bound_s == pytest.approx(r.flops_per_device / (r.peak_tflops * 1e12))
  assert r.hbm_bound_s == pytest.approx(r.bytes_per_device / (r.hbm_gbps * 1e9))
  assert r.bound_s == max(r.compute_bound_s, r.hbm_bound_s) > 0
  assert r.bound_by == ("compute" if r.compute_bound_s >= r.hbm_bound_s else "HBM bytes")


@needs_libtpu
def test_aot_compile_for_tpu_v5e_cli(tmp_path, capsys):
  out = tmp_path / "r.json"
  argv = ["compile", "--config", "configs/text.py:variant=tiny", "--topology", "v5e-4",
          "--config.model.vocab_size=96", f"--json={out}"] + [f"--config.{k}={v}" for k, v in WIDE.items()]
  assert C.main(argv) == C.EXIT_OK
  text = capsys.readouterr().out
  assert "[tpu]" in text and "-> fits" in text and "of 15.75 GiB HBM" in text
  _check_honest_lines(text)
  r = aot.Report(**json.loads(out.read_text()))
  assert r.backend == "tpu" and r.mesh == {"data": 4, "fsdp": 1, "tensor": 1}
  _check_figures(r, 4)
  # On TPU the layers are a loop that XLA counts once: its raw figure misses one of 2 layers.
  assert r.xla_flops_raw < 0.8 * r.flops_per_device


def test_aot_compile_cpu_fallback():
  topo = C.parse_topology("v5e-4")
  devices, backend = C.target_devices(topo, force_cpu=True)
  assert backend.startswith("cpu-fallback") and len(devices) == 4
  assert all(d.platform == "cpu" for d in devices)
  r = C.compile_step(tiny_text_config(**WIDE), topo, devices=devices, backend=backend)
  _check_figures(r, 4)


def test_step_that_does_not_fit_exits_nonzero(capsys):
  # A 20M-token vocabulary: 4.8 GiB of f32 embedding per copy, replicated (pure data
  # parallel); params + 2 Adam moments + gradients > 15.75 GiB of v5e HBM.
  argv = ["compile", "--config", "configs/text.py:variant=tiny", "--topology", "v5e-4",
          "--config.model.vocab_size=20000000", "--config.data.block_size=16",
          "--config.batch_size=8"]
  if importlib.util.find_spec("libtpu") is None:
    argv.append("--fallback")
  assert C.main(argv) == C.EXIT_NO_FIT
  err = capsys.readouterr().err
  assert "does not fit TPU v5e HBM (15.75 GiB per device)" in err
  assert "--config.mesh.preset=fsdp" in err


def test_out_of_memory_advice_names_only_what_is_not_set():
  from d2v_jax import config as config_lib
  cfg = config_lib.load_file("configs/audio.py:variant=base,v2")   # bf16 by default (base)
  advice = C.oom_advice(cfg)
  assert "dtype=bfloat16" not in advice and advice.startswith("Try --config.model.encoder.remat=full")
  cfg.model.encoder.remat = "full"
  assert C.oom_advice(cfg).startswith("Try --config.mesh.preset=fsdp")
  cfg.mesh.preset = "fsdp"
  advice = C.oom_advice(cfg)
  assert advice.startswith("dtype, remat and FSDP are already set. Or lower the batch")
  assert "--config.batch_size=N scales the recipe" in advice
  cfg.dtype = "float32"
  assert C.oom_advice(cfg) == advice.replace("dtype, remat and FSDP are already set",
                                             "Try --config.dtype=bfloat16")


def test_batch_search_finds_the_edge_in_few_compiles(monkeypatch):
  """A fake compiler whose memory is 1 GiB + 0.3 GiB per example (v5e: 15.75 GiB): the
  largest fitting per-device batch is 49. The search brackets it within 1/8 in <= 4 compiles."""
  topo = C.parse_topology("v5e-8")
  calls = []

  def fake_compile(cfg, topo_, *, devices=None, backend="tpu"):
    b = cfg.batch_size // 8
    calls.append(b)
    total = (1.0 + 0.3 * b) * C.GiB
    r = aot.Report(**{f.name: None for f in C.dataclasses.fields(aot.Report)})
    r.memory = {"total": total, "temp": 0.3 * b * C.GiB}
    r.fits, r.compile_s = total <= topo_.chip.hbm_gib * C.GiB, 0.0
    return r

  monkeypatch.setattr(batch_search, "compile_step", fake_compile)
  lo, hi, seen = C.search_batch(tiny_text_config(), topo, None, "tpu", start=8, log=lambda s: None)
  assert lo == 49 and hi is not None and hi - lo <= 49 // 8
  assert calls[:2] == [8, 49] and len(calls) <= 4

  # Nothing fits at the start (compiler OOM, no memory figures): halve until something does.
  def oom_above_3(cfg, topo_, *, devices=None, backend="tpu"):
    b = cfg.batch_size // 8
    r = aot.Report(**{f.name: None for f in C.dataclasses.fields(aot.Report)})
    r.memory, r.fits, r.compile_s = ({}, False, 0.0) if b > 3 else (
        {"total": C.GiB, "temp": 0.1 * C.GiB * b}, True, 0.0)
    return r

  monkeypatch.setattr(batch_search, "compile_step", oom_above_3)
  lo, hi, _ = C.search_batch(tiny_text_config(), topo, None, "tpu", start=16, log=lambda s: None)
  assert (lo, hi) == (3, 4)


def test_table_goes_between_markers(tmp_path):
  path = tmp_path / "scale.md"
  path.write_text(f"# Scale\n\nintro\n\n{scale_table.TABLE_BEGIN}\nold\n{scale_table.TABLE_END}\n\noutro\n")
  rep = aot.Report(**{f.name: None for f in C.dataclasses.fields(aot.Report)})
  rep = C.dataclasses.asdict(rep) | {
      "mesh": {"data": 1, "fsdp": 8, "tensor": 1}, "memory": {"total": 15 * C.GiB},
      "hbm_bytes": 15.75 * C.GiB, "flops_per_device": 2.5e12, "model_flops": 8 * 2.4e12,
      "num_devices": 8, "bound_s": 0.02, "compute_bound_s": 0.0127, "bound_by": "HBM bytes",
      "remat": "full"}
  # A row cached before the bound was stored: est_step_s (the same roofline max) is converted;
  # 2.5 TFLOP at v5e's 197 TFLOP/s = 12.7 ms < 20 ms, so HBM bytes bound it.
  old = {k: v for k, v in rep.items() if k not in ("bound_s", "compute_bound_s", "bound_by", "remat")}
  old |= {"est_step_s": 0.02, "est_mfu": 0.61}
  scale_table.write_markdown(str(path), [
      {"entry": "text:base", "topology": "v5e-8", "report": rep, "largest_batch": 49, "first_failing": 55},
      {"entry": "text:base", "topology": "v5e-8", "report": old, "largest_batch": 49, "first_failing": 55,
       "overrides": ["dtype=bfloat16"]}])
  text = path.read_text()
  assert text.startswith("# Scale\n\nintro\n\n") and text.endswith("\n\noutro\n") and "old" not in text
  assert ("| text:base | v5e-8 | 1x8x1 | full | 49 (55 does not fit) | 15.0 of 15.75 GiB | 2.5 T (2.4 T) "
          "| >= 20 ms | HBM bytes |") in text
  assert ("| text:base | v5e-8 | 1x8x1 | none | 49 (55 does not fit) | 15.0 of 15.75 GiB | 2.5 T (2.4 T) "
          "| >= 20 ms | HBM bytes |") in text
  assert "MFU" not in text


@needs_libtpu
def test_aot_compile_two_slices():
  """Two v5e 2x2 slices joined over DCN, preset fsdp: data spans the slices, fsdp the chips
  of each; the step compiles and the parameter shards are 1/4 (fsdp=4) of the whole."""
  topo = C.parse_topology("v5e-4", num_slices=2)
  devices, backend = C.target_devices(topo)
  cfg = tiny_text_config(**{"mesh.preset": "fsdp", "batch_size": 16})
  r = C.compile_step(cfg, topo, devices=devices, backend=backend)
  assert r.mesh == {"data": 2, "fsdp": 4, "tensor": 1} and r.num_devices == 8
  assert r.fits and r.memory["temp"] > 0 and r.flops_per_device > 0
  # Tiny text params: 155776 floats; 1024 of them (biases without an embed axis) stay whole.
  assert r.state_bytes["params"] == 4 * ((155776 - 1024) // 4 + 1024)


def test_string_overrides_take_the_type_of_the_existing_value():
  """config.apply_override (compile --table entries, bench input --set)."""
  from d2v_jax import config as config_lib
  cfg = tiny_text_config()
  for item in ("model.encoder.remat=full", "dtype=bfloat16", "batch_size=32",
               "optim.lr=0.002", "model.encoder.scan=false"):
    config_lib.apply_override(cfg, item)
  assert (cfg.model.encoder.remat, cfg.dtype, cfg.batch_size, cfg.optim.lr,
          cfg.model.encoder.scan) == ("full", "bfloat16", 32, 0.002, False)
  for bad in ("model.encoder.no_such_key=1", "no_such.parent=1", "batch_size"):
    with pytest.raises(config_lib.ConfigError, match="expected KEY=VALUE with an existing key"):
      config_lib.apply_override(cfg, bad)
  with pytest.raises(config_lib.ConfigError, match=r"'abc' is not a int like the current value 32"):
    config_lib.apply_override(cfg, "batch_size=abc")
  audio = config_lib.load_file("configs/audio.py:runlocal")
  config_lib.apply_override(audio, "data.buckets=(16000, 32000)")
  assert audio.data.buckets == (16000, 32000)
  config_lib.apply_override(audio, "data.buckets=()")     # the unbucketed (padded) input
  assert audio.data.buckets == ()
  with pytest.raises(config_lib.ConfigError, match="is not a tuple"):
    config_lib.apply_override(audio, "data.buckets=(16000,")


def test_batch_search_per_remat_policy_with_a_fake_compiler(monkeypatch):
  """search_remat: one search per policy, each starting where the previous one ended. Fake
  memory 1 GiB + (0.3 GiB none | 0.1 GiB full) per example on v5e (15.75 GiB): 49 and 147."""
  topo = C.parse_topology("v5e-8")
  per_example = {"none": 0.3, "full": 0.1, "save_dots": 0.2}

  def fake_compile(cfg, topo_, *, devices=None, backend="tpu"):
    b = cfg.batch_size // 8
    total = (1.0 + per_example[cfg.model.encoder.remat] * b) * C.GiB
    r = aot.Report(**{f.name: None for f in C.dataclasses.fields(aot.Report)})
    r.memory = {"total": total, "temp": total - C.GiB}
    r.fits, r.compile_s, r.remat = total <= topo_.chip.hbm_gib * C.GiB, 0.0, cfg.model.encoder.remat
    r.hbm_bytes, r.flops_per_device, r.bound_s, r.bound_by = topo_.chip.hbm_gib * C.GiB, 1e12, 0.01, "compute"
    r.global_batch, r.num_devices, r.batch_per_device = cfg.batch_size, 8, b
    return r

  monkeypatch.setattr(batch_search, "compile_step", fake_compile)
  rows = C.search_remat(tiny_text_config(), topo, None, "tpu", C.remat_names("none,full,dots"),
                        log=lambda s: None)
  assert [(r["remat"], r["largest_batch"]) for r in rows][:2] == [("none", 49), ("full", 147)]
  assert rows[2]["remat"] == "save_dots"   # the alias resolves to its policy name
  table = C.remat_table(rows[:2])
  assert "| none | 49 (" in table and "| full | 147 (" in table and "| compute |" in table
  from d2v_jax.models import transformer
  assert C.remat_names("all") == list(transformer.REMAT_POLICIES)
  with pytest.raises(ValueError, match="use one of"):
    C.remat_names("none,everything")


@needs_libtpu
def test_largest_batch_per_remat_policy_on_tpu(tmp_path, capsys):
  """`--search_batch --remat none,full` on a compile-only v5e-4, one compile per policy
  (--max_trials=1: a full search compiles the step 3-6 times per policy, each 1-1.5 min at
  a few GiB on 2 cores; the search itself is tested above with a fake compiler): compiler-exact
  memory per device for each, a table row per policy with its largest batch (here the bound
  ">= 64"), full remat's temporaries below none's, and no unlabelled estimate."""
  out = tmp_path / "remat.json"
  argv = ["compile", "--config", "configs/text.py:variant=tiny", "--topology", "v5e-4",
          "--config.model.vocab_size=96", "--config.data.block_size=32", "--search_batch",
          "--remat", "none,full", "--batch_per_device=64", "--max_trials=1", f"--json={out}"]
  assert C.main(argv) == C.EXIT_OK
  text = capsys.readouterr().out
  assert re.findall(r"^\| (none|full) \| >= 64 \(search stopped\) \| [0-9.]+ of 15.75 GiB \|", text,
                    re.M) == ["none", "full"], text
  assert len(re.findall(r"batch/device +64: +[0-9.]+ GiB fits", text)) == 2, text
  assert "TPU v5e (15.75 GiB HBM per device), per remat policy:" in text
  # the batch found, through the batch-size scaling rule (d2v_jax/scaling.py): 64 x 4 = 256
  assert "global batch 256 = 1 x the recipe's 256: --config.batch_size=256 scales the recipe " \
         "to optim.lr 0.0002, teacher.tau_start 0.999" in text, text
  _check_honest_lines(text)
  rows = {row["remat"]: row["report"] for row in json.loads(out.read_text())}
  assert rows["full"]["memory"]["temp"] < rows["none"]["memory"]["temp"]
  assert rows["full"]["backend"] == "tpu" and rows["full"]["remat"] == "full"


@needs_libtpu
def test_aot_compile_of_the_v2_step_for_tpu():
  """data2vec 2.0 compiles for a TPU topology through the same path; its traced matmuls equal
  the v2 analytic count (teacher on B sequences, student on B x M visible tokens, decoder)
  within 5 % (measured +3.1 %: the analytic count takes a conv's backward as 2x its forward;
  XLA's transposed convs over the padded sequence do a little more)."""
  from d2v_jax import config as config_lib
  cfg = config_lib.load_file("configs/text.py:variant=tiny,v2")
  cfg.model.vocab_size = 96
  for k, v in {**WIDE, "batch_size": 8, "v2.clone_batch": 2}.items():
    config_lib.set_path(cfg, k, v)
  devices, backend = C.target_devices(C.parse_topology("v5e-4"))
  r = C.compile_step(cfg, C.parse_topology("v5e-4"), devices=devices, backend=backend)
  assert r.fits and r.memory["temp"] > 0
  assert 1.0 <= r.traced_matmul_flops / r.model_flops < 1.05


def test_table_loop_caches_rows_and_keeps_a_broken_entry(tmp_path, capsys):
  """scale_table._compile_rows (both tables' loop): one row per (entry, topology) appended to the
  cache, an entry whose search raises becomes an error row, a second call compiles nothing."""
  cache = str(tmp_path / "rows.jsonl")
  calls = []

  def search(cfg, topo, devices, backend, log):
    calls.append(cfg.modality)
    if cfg.modality == "audio":
      raise ValueError("no room\nsecond line")
    return {"report": {"batch": cfg.batch_size}}

  args = (("vision:base", "audio:base"), ("v5e-8",), "fit", ("mesh.preset=fsdp",), cache, True)
  rows = scale_table._compile_rows(*args, search, failed={"report": None})
  assert calls == ["vision", "audio"]
  assert [(r["entry"], r["kind"], r["error"], r["report"]) for r in rows] == [
      ("vision:base", "fit", "", {"batch": 2048}),
      ("audio:base", "fit", "ValueError: no room", None)]
  assert rows[0]["overrides"] == ["mesh.preset=fsdp"] and rows[0]["recipe_batch"] == 2048
  assert len(open(cache).readlines()) == 2 and "  failed: ValueError: no room" in capsys.readouterr().out
  assert scale_table._compile_rows(*args, search, failed={}) == rows and len(calls) == 2
  # the other table's rows are another kind: compiled anew, cached without a "kind" key
  largest = scale_table._compile_rows(*args[:2], "largest", *args[3:], search, failed={})
  assert len(calls) == 4 and [("kind" in r, r["entry"]) for r in largest] == [
      (False, "vision:base"), (False, "audio:base")]
