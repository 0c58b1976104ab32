"""The model's CPU-only speed-ups, in one place. Each is chosen by the platform the program is
compiled for, never patched into JAX:

  conv1d(x, w, pad, groups)   stride-1 grouped 1-D convolution (data2vec 2.0 1-D decoder).
                              On CPU its gradients are computed as forward convolutions:
                              XLA:CPU's own backward of a grouped convolution (an lhs-dilated
                              / batch-grouped conv) is several times slower than its forward.
  conv2d(x, w, groups)        stride-1 'same' 2-D grouped convolution (vision decoder). On CPU
                              one matmul over the stacked kernel taps: XLA:CPU runs grouped
                              convolutions through a slow generic loop.
  unroll(platform, ...)       layers per scan iteration: on CPU the whole stack (no stacked
                              residual buffers and copies of the loop).

The two convolutions use jax.lax.platform_dependent: both branches are traced and the one for
the platform the program is lowered for is kept, so a TPU or GPU compile (an ahead-of-time
one from a CPU host included) gets XLA's own convolution. The unroll follows the platform of
the mesh the step is built on (build.py sets EncoderSpec.platform). Each is tested equal to
the plain op, values and gradients (tests/test_v2.py, tests/test_remat.py); speed-ups are
measured in docs/performance.md.
"""

from __future__ import annotations

import functools
import itertools

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


def unroll(platform_name: str, num_layers: int, scan_unroll: int, remat: bool) -> int:
  """Scan iterations to unroll: model.encoder.scan_unroll when set (> 0); else on CPU the
  whole stack (text / vision small steps 1.19x / 1.18x faster) and 1 elsewhere. Not with
  remat: unrolled, XLA's common subexpression elimination merges the recomputation back."""
  if scan_unroll > 0:
    return min(scan_unroll, num_layers)
  return num_layers if platform_name == "cpu" and not remat else 1


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


def conv1d(x, w, pad: tuple[int, int], groups: int, impl: str = "auto"):
  """x [B, T, Cin] (NWC) * w [K, Cin/groups, Cout] (WIO), stride 1. impl: auto (per platform),
  xla, or cpu (forward-conv gradients everywhere; tests)."""
  cpu = functools.partial(_conv1d_fwd_grads, pad=pad, groups=groups)
  xla = functools.partial(_conv1d_xla, pad=pad, groups=groups)
  if impl != "auto":
    return (cpu if impl == "cpu" else xla)(x, w)
  return jax.lax.platform_dependent(x, w, cpu=cpu, default=xla)


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


def conv2d(x, kernel, groups: int, impl: str = "auto"):
  """Stride-1 'same' 2-D convolution, x [N, H, W, Cin] * kernel [kh, kw, Cin/groups, Cout].
  impl: auto (taps on CPU when grouped, XLA's elsewhere), xla, or cpu (taps; tests)."""
  cpu = functools.partial(_conv2d_taps, groups=groups)
  xla = functools.partial(_conv2d_xla, groups=groups)
  if impl != "auto":
    return (cpu if impl == "cpu" else xla)(x, kernel)
  if groups == 1:
    return xla(x, kernel)
  return jax.lax.platform_dependent(x, kernel, cpu=cpu, default=xla)
