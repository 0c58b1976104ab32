"""The model's CPU-only speed-ups, in one place. Each is chosen when the model is built for a
CPU mesh (build.py sets EncoderSpec.platform to the mesh's platform), never patched into JAX:

  conv1d(x, w, pad, groups)   stride-1 grouped 1-D convolution (data2vec 2.0 1-D decoder).
                              On CPU its gradients are computed as forward convolutions:
                              XLA:CPU's own backward of a grouped convolution (an lhs-dilated
                              / batch-grouped conv) is several times slower than its forward.
  conv2d(x, w, groups)        stride-1 'same' 2-D grouped convolution (vision decoder). On CPU
                              one matmul over the stacked kernel taps: XLA:CPU runs grouped
                              convolutions through a slow generic loop.
  Dense(cpu=True)             nn.Dense whose weight gradient transposes the smaller operand
                              explicitly (XLA:CPU transposes the larger one).
  unroll(platform, ...)       layers per scan iteration: on CPU the whole stack (no stacked
                              residual buffers and copies of the loop).
  fast_threefry()             the CPU lowering of jax's threefry2x32 (dropout's random bits)
                              as one straight-line kernel, as jax lowers it for GPU / TPU,
                              instead of a rolled 5-iteration loop: the same bits.

A model built for a TPU or GPU mesh (an ahead-of-time compile from a CPU host included: its
mesh is the target topology's) holds XLA's own ops only: `impl_for(platform)` picks the conv
paths, `Dense(cpu=...)` the gradient, `unroll` the scan, all from the build platform; nothing
CPU-specific is traced into those programs. build.py calls fast_threefry() only for a CPU
mesh: it is the one hook into jax internals (jax._src), registered explicitly, never at
import, and skipped when the internals moved.
Each is tested equal to the plain op (tests/test_cpu_ops.py, tests/test_v2.py).

Re-measured on the 2-core CPU machine (`python -m d2v_jax.bench`-style setups, median process
CPU ms per step, old = with, new = without): threefry 13 % and the Dense gradient 8 % of a
text small step; both together 6 % of vision small and 4 % of audio small; the unrolled scan
1.18x on text / vision small; the taps 2-D conv 10-28x on the vision decoder; the 1-D
forward-conv gradients ~4.6x on the grouped conv backward (docs/performance.md).
"""

from __future__ import annotations

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp


def platform_of(device) -> str:
  """cpu | gpu | tpu, or rocm for a non-CUDA GPU."""
  if device.platform == "gpu":
    try:
      if "rocm" in device.client.platform_version.lower():
        return "rocm"
    except Exception:  # noqa: BLE001 - unknown client: assume CUDA
      pass
  return device.platform


def platform(spec_platform: str = "") -> str:
  """The platform a model is built for: the spec's (build.py sets the mesh's), else the
  backend jax lowers for by default."""
  return spec_platform or platform_of(jax.devices()[0])


def impl_for(platform_name: str = "") -> str:
  """The conv implementation for a model built for `platform_name` ("" = jax's default
  backend): "cpu" (the forms above) on CPU, "xla" elsewhere."""
  return "cpu" if platform(platform_name) == "cpu" else "xla"


def unroll(platform_name: str, num_layers: int, scan_unroll: int, remat: bool) -> int:
  """Scan iterations to unroll: model.encoder.scan_unroll when set (> 0); else on CPU the
  whole stack (text / vision small steps 1.19x / 1.18x faster) and 1 elsewhere. Not with
  remat: unrolled, XLA's common subexpression elimination merges the recomputation back."""
  if scan_unroll > 0:
    return min(scan_unroll, num_layers)
  return num_layers if platform_name == "cpu" and not remat else 1


def _dw_cpu(x2, g2):
  """x2 [M, K], g2 [M, N] -> x2^T g2 [K, N] with the smaller operand transposed explicitly; the
  barriers keep XLA from folding the transposes back into the dot."""
  k, n = x2.shape[1], g2.shape[1]
  if k <= n:
    return jnp.dot(jax.lax.optimization_barrier(x2.T), g2)
  return jax.lax.optimization_barrier(jnp.dot(jax.lax.optimization_barrier(g2.T), x2)).T


@jax.custom_vjp
def matmul_cpu(x, w):
  """x [..., K] @ w [K, N]; the same product as nn.Dense, with a CPU-friendly weight gradient."""
  return jnp.dot(x, w)


def _matmul_fwd(x, w):
  return jnp.dot(x, w), (x, w)


def _matmul_bwd(res, g):
  x, w = res
  k, n = w.shape
  dx = jnp.dot(g, w.T).astype(x.dtype)
  dw = _dw_cpu(x.reshape(-1, k), g.reshape(-1, n))
  return dx, dw.astype(w.dtype)


matmul_cpu.defvjp(_matmul_fwd, _matmul_bwd)


class Dense(nn.Dense):
  """nn.Dense (same parameters, initialisers and dtype promotion); `cpu=True` (a model built
  for a CPU mesh) computes it with `matmul_cpu`."""
  cpu: bool = False

  @nn.compact
  def __call__(self, inputs):
    kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features),
                        self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    y = matmul_cpu(inputs, kernel) if self.cpu else jnp.dot(inputs, kernel)
    if bias is not None:
      y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


_FAST_THREEFRY: list = []


def fast_threefry() -> bool:
  """Registers jax's own straight-line threefry2x32 lowering (the GPU / TPU one) for CPU; once
  per process. False (and nothing registered) when jax's internals are not where expected."""
  if not _FAST_THREEFRY:
    try:
      # jax internals (see the module docstring): imported only where they are registered
      from jax._src.interpreters import mlir
      from jax._src.random import threefry2x32 as tf
      mlir.register_lowering(tf.threefry2x32_p, tf._threefry2x32_lowering_rule, platform="cpu")
      _FAST_THREEFRY.append(True)
    except (ImportError, AttributeError):
      _FAST_THREEFRY.append(False)
  return _FAST_THREEFRY[0]


def _conv1d_xla(x, w, pad: tuple[int, int], groups: int):
  return jax.lax.conv_general_dilated(x, w, (1,), (pad,), dimension_numbers=("NWC", "WIO", "NWC"),
                                      feature_group_count=groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv1d_fwd_grads(x, w, pad: tuple[int, int], groups: int):
  return _conv1d_xla(x, w, pad, groups)


def _fwd(x, w, pad, groups):
  return _conv1d_xla(x, w, pad, groups), (x, w)


def _bwd(pad, groups, res, gy):
  x, w = res
  k, cg, cout = w.shape
  og = cout // groups
  lo, hi = pad
  # dx: correlate gy with the time-flipped kernel, in/out channels swapped within each group.
  wt = jnp.flip(w.reshape(k, cg, groups, og), 0).transpose(0, 3, 2, 1).reshape(k, og, groups * cg)
  dx = _conv1d_xla(gy, wt.astype(gy.dtype), (k - 1 - lo, k - 1 - hi), groups)
  # dw[k, c, g*og + o] = sum_{b,t} xpad[b, t + k, g*cg + c] * gy[b, t, g*og + o]: a grouped
  # forward conv over time with batch and channels swapped (window = output length).
  b, t_out = gy.shape[0], gy.shape[1]
  xp = jnp.pad(x, ((0, 0), (lo, hi), (0, 0)))
  lhs = xp.reshape(b, xp.shape[1], groups, cg).transpose(3, 1, 2, 0).reshape(cg, xp.shape[1], groups * b)
  rhs = gy.reshape(b, t_out, groups, og).transpose(1, 0, 2, 3).reshape(t_out, b, groups * og)
  dw = _conv1d_xla(lhs, rhs.astype(lhs.dtype), (0, 0), groups).transpose(1, 0, 2)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_conv1d_fwd_grads.defvjp(_fwd, _bwd)


def conv1d(x, w, pad: tuple[int, int], groups: int, impl: str = "xla"):
  """x [B, T, Cin] (NWC) * w [K, Cin/groups, Cout] (WIO), stride 1. impl (impl_for): xla, or
  cpu (gradients as forward convolutions)."""
  if impl == "cpu":
    return _conv1d_fwd_grads(x, w, pad, groups)
  return _conv1d_xla(x, w, pad, groups)


def _conv2d_xla(x, kernel, groups):
  pad = [(k // 2, k // 2) for k in kernel.shape[:-2]]
  dims = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), pad, dimension_numbers=dims,
                                      feature_group_count=groups)


def _conv2d_taps(x, kernel, groups):
  """The same convolution as one batched matmul over the stacked kernel taps (im2col per
  group); the FLOPs are the same, the stacked taps cost k^2 x the input's memory."""
  window, (cg, cout) = kernel.shape[:-2], kernel.shape[-2:]
  spatial = x.shape[1:-1]
  xp = jnp.pad(x, [(0, 0)] + [(k // 2, k // 2) for k in window] + [(0, 0)])
  taps = [xp[(slice(None),) + tuple(slice(t, t + s) for t, s in zip(tap, spatial))]
          for tap in itertools.product(*(range(k) for k in window))]
  cols = jnp.stack(taps, axis=-2)                                # [N, *S, taps, C_in]
  cols = cols.reshape(*cols.shape[:-1], groups, cg)              # [N, *S, taps, G, C_in/G]
  w = kernel.reshape(len(taps), cg, groups, cout // groups)      # row-major taps, as stacked
  y = jnp.einsum("...tgc,tcgo->...go", cols, w)
  return y.reshape(*y.shape[:-2], cout)


def conv2d(x, kernel, groups: int, impl: str = "xla"):
  """Stride-1 'same' 2-D convolution, x [N, H, W, Cin] * kernel [kh, kw, Cin/groups, Cout].
  impl (impl_for): xla, or cpu (the taps matmul for a grouped conv; XLA's for groups=1)."""
  if impl == "cpu" and groups > 1:
    return _conv2d_taps(x, kernel, groups)
  return _conv2d_xla(x, kernel, groups)
