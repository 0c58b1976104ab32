"""GPU: step time, examples/s, peak memory and MFU of the base models per attention implementation.

  python -m d2v_jax.bench gpu [--modality all] [--steps 8] [--budget-s 420] [--out DIR]
      [--batch text=64] [--remat none]

Needs a CUDA GPU (pip install -r requirements-gpu.txt); anywhere else it prints one line,
"no GPU: nothing measured", and exits 0.

Per modality, the base config in bfloat16 at its production length (text 512 tokens; vision
224 px in 16 px patches + CLS = 197 positions; audio 20 s = 999 frames) on one GPU:
  1. parity: the cuDNN path against the XLA path on one attention call of the model's shape
     and bias kind (forward and gradients, bf16); a failure drops that modality's fused rows.
  2. rows, in this order, while the time budget lasts:
       auto                        the reference recipe (attention dropout > 0): the teacher
                                   gets cuDNN, the student XLA
       xla                         XLA attention everywhere
       auto, attention_dropout=0   cuDNN for teacher and student
     each with the first remat policy of none, minimal, full whose step compiles and runs
     at the batch (--remat fixes one), `--steps` timed steps after 2 warm-up steps.
Reported: median step ms, examples/s, compiled memory (XLA memory analysis of the step:
arguments + outputs - aliased + temporaries), the process's peak GPU memory so far
(memory_stats), analytic model TFLOP per step (d2v_jax/flops.py: matmuls of teacher forward,
student forward + head, student backward = 2x) and MFU against a bf16 8192^3 matmul timed in
the same run (median of 20; the MFU denominator is measured, not a datasheet figure).

Batches are synthetic (numpy; no TensorFlow needed: a missing TensorFlow is replaced by a stub
the input pipeline modules can import, as they are not used here).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from d2v_jax import bench

COLUMNS = ["modality", "attention", "used (teacher / student)", "remat", "batch", "positions",
           "step ms", "examples/s", "compiled GiB", "process peak GiB", "TFLOP/step",
           "TFLOP/s", "MFU %", "status"]

PROBLEMS = {   # modality -> (config, batch per GPU: fits 141 GiB without remat by the v5p table)
    "text": ("configs/text.py:variant=base", 64),
    "vision": ("configs/vision.py:variant=base", 256),
    "audio": ("configs/audio.py:variant=base", 24),
}
VARIANTS = (   # (label, config overrides), most important first
    ("auto", {}),
    ("xla", {"model.encoder.attention": "xla"}),
    ("auto, attention_dropout=0", {"model.encoder.attention_dropout": 0.0}),
)
REMAT_ORDER = ("none", "minimal", "full")
PEAK_N = 8192
ROW_SECONDS = 45       # a row is not started with less budget left than this
NO_GPU = "no GPU: nothing measured"


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--modality", default="all", help="text | vision | audio | all")
  p.add_argument("--steps", type=int, default=8, help="timed steps per row")
  p.add_argument("--budget-s", type=float, default=420.0,
                 help="stop starting rows after this many seconds (parity and peak included)")
  p.add_argument("--batch", action="append", default=None, metavar="MODALITY=N",
                 help="examples per step, e.g. text=32 (repeatable)")
  p.add_argument("--remat", default="", help="one remat policy for every row "
                 "(default: the first of none, minimal, full that fits)")
  p.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)  # tests: tiny, CPU
  p.add_argument("--out", default="bench_results")


def gpu_devices(platform: str = "gpu") -> list:
  try:
    return list(jax.devices(platform))
  except RuntimeError:
    return []


def stub_tensorflow() -> bool:
  """Lets the data modules import where TensorFlow is not installed (they import it at the
  top; nothing here calls it). Returns True when a stub was installed."""
  try:
    import tensorflow  # noqa: F401
    return False
  except ImportError:
    pass

  class _Missing:
    def __init__(self, name):
      self._name = name

    def __getattr__(self, attr):
      return _Missing(f"{self._name}.{attr}")

    def __call__(self, *a, **k):
      raise RuntimeError(f"{self._name}: TensorFlow is not installed (bench gpu stub)")

  stub = types.ModuleType("tensorflow")
  stub.__getattr__ = lambda attr: _Missing(f"tensorflow.{attr}")
  sys.modules["tensorflow"] = stub
  return True


def host_batch(cfg, seed: int = 0) -> dict:
  """A v1 batch with the real shapes (numpy only): text tokens with 15 % masked, vision
  Gaussian pixels with 60 % of patches masked, audio Gaussian with every other row a quarter
  padded and 65 % of frames masked."""
  rng = np.random.default_rng(seed)
  b = cfg.batch_size
  if cfg.modality == "text":
    # after stub_tensorflow(): the data modules import TensorFlow at their top
    from d2v_jax.data.text import random_ids
    v, t = cfg.model.vocab_size, cfg.data.block_size
    source = random_ids(rng, b, t, v)
    mask = rng.random((b, t)) < 0.15
    mask[:, 0] = mask[:, -1] = False
    return {"source": source, "student": np.where(mask, v - 1, source).astype(np.int32),
            "mask": mask}
  if cfg.modality == "vision":
    s, g = cfg.model.image_size, cfg.model.image_size // cfg.model.patch_size
    return {"image": rng.standard_normal((b, s, s, cfg.model.channels)).astype(np.float32),
            "mask": rng.random((b, g * g)) < 0.6}
  if cfg.modality == "audio":
    # after stub_tensorflow(): the data modules import TensorFlow at their top
    from d2v_jax.data.masking_audio import conv_output_length
    s = int(cfg.data.max_samples)
    lengths = np.where(np.arange(b) % 2 == 0, s, (3 * s) // 4).astype(np.int32)
    audio = rng.standard_normal((b, s)).astype(np.float32)
    audio[np.arange(s)[None, :] >= lengths[:, None]] = 0.0
    frames = positions(cfg)
    valid = np.asarray([int(conv_output_length(int(n), cfg.model.conv_kernels, cfg.model.conv_strides))
                        for n in lengths])
    mask = (rng.random((b, frames)) < 0.65) & (np.arange(frames)[None, :] < valid[:, None])
    return {"audio": audio, "audio_len": lengths, "mask": mask}
  raise ValueError(f"no batch for modality {cfg.modality!r}")


def _config(modality: str, batch: int, overrides: dict, smoke: bool):
  # after stub_tensorflow(): the data modules import TensorFlow at their top
  from d2v_jax import config as config_lib
  from d2v_jax.bench import setups
  cwd = os.getcwd()
  os.chdir(setups.repo_root())
  try:
    spec = PROBLEMS[modality][0].replace("variant=base", "variant=tiny,runlocal") if smoke else PROBLEMS[modality][0]
    cfg = config_lib.load_file(spec)
  finally:
    os.chdir(cwd)
  if modality == "text":
    cfg.model.vocab_size = cfg.model.vocab_size or int(cfg.data.vocab_size)
    if smoke:
      cfg.data.block_size = 32
  cfg.dtype = "bfloat16"
  cfg.batch_size = batch
  for k, v in overrides.items():
    config_lib.set_path(cfg, k, v)
  return cfg


def _oom(e: Exception) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def positions(cfg) -> int:
  """Encoder positions per example at the config's input length."""
  if cfg.modality == "text":
    return int(cfg.data.block_size)
  if cfg.modality == "vision":
    return (cfg.model.image_size // cfg.model.patch_size) ** 2 + 1
  # after stub_tensorflow(): the data modules import TensorFlow at their top
  from d2v_jax.data.masking_audio import conv_output_length
  return int(conv_output_length(int(cfg.data.max_samples), cfg.model.conv_kernels,
                                cfg.model.conv_strides))


def _bias_kind(cfg) -> str:
  # after stub_tensorflow(): the data modules import TensorFlow at their top
  from d2v_jax.modality import load
  return load(cfg.modality).model.ATTENTION_BIAS


def parity(cfg, device, dpa_implementation: str = "cudnn") -> tuple[bool, str]:
  """cuDNN path vs XLA path, bf16, on [2, T, heads, head dim] with the model's bias kind:
  forward and q/k/v gradients within 3e-2 of the largest entry."""
  # after stub_tensorflow(): the data modules import TensorFlow at their top
  from d2v_jax.models import transformer as T
  e = cfg.model.encoder
  h, d = e.heads, e.hidden // e.heads
  t = positions(cfg)
  r = np.random.default_rng(0)
  q, k, v = (jax.device_put(jnp.asarray(r.standard_normal((2, t, h, d)), jnp.bfloat16), device)
             for _ in range(3))
  if _bias_kind(cfg) == "shared":
    bias = jnp.asarray(0.5 * r.standard_normal((1, h, t, t)), jnp.float32)
  else:
    valid = np.ones((2, t), bool)
    valid[1, (3 * t) // 4:] = False
    valid[0, t // 3] = False           # a hole: exercises the key sort of key_padding="any"
    bias = T.padding_bias(jnp.asarray(valid))
  bias = jax.device_put(bias, device)

  def f(impl, **kw):
    fn = lambda q, k, v: jnp.sum(jnp.sin(T.attend(q, k, v, bias, impl=impl, **kw).astype(jnp.float32)))
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(q, k, v)

  try:
    want = f("xla")
    got = f("cudnn", dpa_implementation=dpa_implementation)
  except Exception as err:  # noqa: BLE001 - report why the fused path is unusable here
    return False, f"cudnn failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
  worst = 0.0
  for a, b in zip(got[1], want[1]):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    worst = max(worst, float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-6)))
  ok = worst <= 3e-2 and abs(float(got[0]) - float(want[0])) <= 3e-2 * max(abs(float(want[0])), 1.0)
  return ok, f"max gradient error {worst:.2e} of the largest entry"


def measure_peak(device, n: int, reps: int = 20) -> float:
  """bf16 n x n x n matmul FLOP/s on `device` (median of `reps` after a warm-up)."""
  # after stub_tensorflow(): the data modules import TensorFlow at their top
  from d2v_jax.bench import timing
  a = jax.device_put(jnp.ones((n, n), jnp.bfloat16), device)
  b = jax.device_put(jnp.ones((n, n), jnp.bfloat16), device)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  res = timing.run_interleaved({"mm": lambda: f(a, b).block_until_ready()}, reps)
  return 2.0 * n ** 3 / timing.median(res["mm"]["wall"])


def measure_row(cfg, device, steps: int, remats: tuple[str, ...]) -> dict:
  """Compile and time the step with the first remat policy that fits."""
  # after stub_tensorflow(): the data modules import TensorFlow at their top
  from d2v_jax import build as build_lib
  from d2v_jax import flops as flops_lib
  from d2v_jax.bench import timing
  from d2v_jax.models import transformer as T
  last = ""
  for remat in remats:
    cfg.model.encoder.remat = remat
    try:
      built = build_lib.build(cfg, devices=[device])
      state = built.init(0)
      batch = build_lib.to_global(host_batch(cfg), built.batch_shardings)
      t0 = time.perf_counter()
      compiled = built.step.lower(state, batch).compile()
      compile_s = time.perf_counter() - t0
      ma = compiled.memory_analysis()
      holder = {"state": state}

      def step():
        with jax.set_mesh(built.mesh):
          holder["state"], m = compiled(holder["state"], batch)
        jax.block_until_ready((holder["state"], m))

      step()
      step()
      res = timing.run_interleaved({"step": step}, steps)
    except Exception as e:  # noqa: BLE001 - OOM: next policy; anything else: reported
      if _oom(e):
        last = f"{remat}: out of memory"
        continue
      return {"remat": remat, "status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    sec = timing.median(res["step"]["wall"])
    stats = device.memory_stats() or {}
    flops = flops_lib.model_flops(built, batch)[0]["total"]
    spec = T.EncoderSpec.from_config(cfg.model.encoder, cfg.dtype)
    used = {}
    for role, drop in (("teacher", False), ("student", spec.attention_dropout > 0)):
      f = T.AttentionFeatures(_bias_kind(cfg), drop, "bfloat16", spec.hidden // spec.heads)
      used[role] = T.select_attention(spec.attention, T.attention_platform(spec), f)[0]
    compiled_bytes = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
                      + ma.temp_size_in_bytes)
    return {"remat": remat, "batch": cfg.batch_size, "step ms": 1e3 * sec,
            "examples/s": cfg.batch_size / sec, "compiled GiB": compiled_bytes / 2**30,
            "process peak GiB": stats.get("peak_bytes_in_use", 0) / 2**30,
            "TFLOP/step": flops / 1e12, "TFLOP/s": flops / sec / 1e12, "compile s": compile_s,
            "used (teacher / student)": f"{used['teacher']} / {used['student']}",
            "step noise": timing.spread(res["step"]["wall"]), "status": "ok"}
  return {"remat": "/".join(remats), "status": f"does not fit ({last})"}


def main(args: argparse.Namespace) -> int:
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")
  t_start = time.time()
  smoke = args.cpu_smoke
  devices = gpu_devices("cpu" if smoke else "gpu")
  if not devices:
    print(f"{NO_GPU} (jax {jax.__version__} sees {jax.default_backend()} only; "
          f"pip install -r requirements-gpu.txt on a CUDA machine)")
    return 0
  stub = stub_tensorflow()
  # after stub_tensorflow(): the data modules import TensorFlow at their top
  from d2v_jax.bench import setups
  from d2v_jax.models import attention as A, transformer as T
  device = devices[0]
  deadline = t_start + args.budget_s
  batches = {m: (2 if smoke else b) for m, (_, b) in PROBLEMS.items()}
  for item in args.batch or []:
    m, _, n = item.partition("=")
    batches[m.strip()] = int(n)
  remats = (args.remat,) if args.remat else REMAT_ORDER
  steps = 1 if smoke else args.steps
  print(f"device: {device.device_kind} ({device.platform}); tensorflow "
        f"{'stubbed' if stub else 'installed'}; budget {args.budget_s:.0f} s", flush=True)
  peaks = [measure_peak(device, 256 if smoke else PEAK_N, 3 if smoke else 20)]
  print(f"bf16 matmul peak: {peaks[0] / 1e12:.1f} TFLOP/s", flush=True)
  rows = []
  for modality in setups.modalities(args.modality):
    base = _config(modality, batches[modality], {}, smoke)
    ok, why = parity(base, device, "xla" if smoke else "cudnn")
    print(f"{modality}: cudnn parity {'ok' if ok else 'FAILED'} ({why}); "
          + A.describe_attention(T.EncoderSpec.from_config(base.model.encoder, base.dtype),
                                 "gpu", _bias_kind(base)), flush=True)
    for label, over in VARIANTS:
      if smoke and label != "xla":
        continue                      # no cuDNN on CPU
      row = {"modality": modality, "attention": label}
      if not ok and label != "xla":
        rows.append({**row, "status": f"skipped: cudnn parity failed ({why})"})
        continue
      if time.time() > deadline - ROW_SECONDS:
        rows.append({**row, "status": "skipped: time budget"})
        continue
      cfg = _config(modality, batches[modality], over, smoke)
      row.update(measure_row(cfg, device, steps, remats))
      row["positions"] = positions(cfg)
      rows.append(row)
      print(f"  {label}: {row.get('status')} {row.get('step ms', 0):.1f} ms "
            f"({time.time() - t_start:.0f} s elapsed)", flush=True)
  peaks.append(measure_peak(device, 256 if smoke else PEAK_N, 3 if smoke else 20))
  peak = sorted(peaks)[len(peaks) // 2] if len(peaks) > 2 else max(peaks)
  for row in rows:
    if "TFLOP/s" in row:
      row["MFU %"] = 100 * row["TFLOP/s"] * 1e12 / peak
  bench.report("gpu", rows, COLUMNS, bench.out_path(args.out, "gpu"),
               device=device.device_kind, peak_tflops=[p / 1e12 for p in peaks],
               matmul_n=256 if smoke else PEAK_N, steps=steps, tensorflow_stub=stub,
               elapsed_s=time.time() - t_start)
  return 0
