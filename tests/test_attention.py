"""Attention implementations (d2v_jax/models/transformer.py): every one that runs on CPU equals
the XLA reference, forward and gradients, for the biases the models use; `auto` picks the
documented implementation per (platform, features); the bf16 XLA path keeps no float32
[B, H, T, T] tensor for the backward pass.

On CPU: the cuDNN path's own logic (padding bias -> key lengths, key sort for arbitrary
padding, odd lengths padded with a hidden position) runs through
jax.nn.dot_product_attention(implementation="xla"); the Pallas TPU flash kernel runs in TPU
interpret mode (pltpu.force_tpu_interpret_mode). The cuDNN kernel itself needs a GPU
(`python -m d2v_jax.bench gpu` checks it against XLA on the device before timing).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2v_jax.models import attention, transformer as T

B, L, H, D = 2, 13, 2, 16     # odd length: the cuDNN path's extra hidden position is exercised
F32_TOL = 1e-5                # float32, same math in another order: measured <= 3e-7


def _qkv(dtype=jnp.float32, b=B, h=H, seed=0):
  r = np.random.default_rng(seed)
  return [jnp.asarray(r.standard_normal((b, L, h, D)), dtype) for _ in range(3)]


def _biases(b=B, h=H):
  """name -> (bias, kind). Padding: row 0 has a hole (not right-padding), row 1 a padded tail."""
  r = np.random.default_rng(1)
  right = np.ones((b, L), bool)
  right[-1, 9:] = False
  holes = right.copy()
  holes[0, 3] = False           # with b=1: a hole and a padded tail in one row
  rel = jnp.asarray(0.5 * r.standard_normal((1, h, L, L)), jnp.float32)   # relative position
  pos = np.arange(L)
  slopes = 2.0 ** -np.arange(1, h + 1)
  alibi = jnp.asarray(-slopes[:, None, None] * np.abs(pos[:, None] - pos[None, :]), jnp.float32)[None]
  return {
      "none": (None, "none"),
      "padding_right": (T.padding_bias(jnp.asarray(right)), "padding"),
      "padding_holes": (T.padding_bias(jnp.asarray(holes)), "padding"),
      "relative_position": (rel, "shared"),
      "alibi": (alibi, "shared"),
      "relative_position+padding": (rel + T.padding_bias(jnp.asarray(holes)), "per_example"),
  }


def _value_and_grads(impl, bias, q, k, v, **kw):
  """sum(sin(attention)) and its gradients wrt q, k, v and (an additive) bias."""
  def f(q, k, v, b):
    return jnp.sum(jnp.sin(T.attend(q, k, v, b, impl=impl, **kw).astype(jnp.float32)))
  if bias is None:
    return jax.jit(jax.value_and_grad(lambda q, k, v: f(q, k, v, None), argnums=(0, 1, 2)))(q, k, v)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(q, k, v, bias)


def _assert_close(got, want, kind, tol):
  (gv, gg), (wv, wg) = got, want
  np.testing.assert_allclose(gv, wv, rtol=tol, atol=tol)
  # A padding bias is a mask that the fused paths turn into lengths / segment ids: no
  # gradient flows to it (it is no parameter). Additive biases must get the same gradient.
  n = 3 if kind in ("none", "padding") else 4
  for a, b in zip(gg[:n], wg[:n]):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", list(_biases()))
def test_dot_product_attention_path_equals_xla(name):
  """The cudnn path (jax.nn.dot_product_attention, here its XLA implementation): float32
  forward and gradients equal the reference to 1e-5, for key_padding any and right."""
  bias, kind = _biases()[name]
  assert T.bias_kind(None if bias is None else bias.shape) == kind
  q, k, v = _qkv()
  want = _value_and_grads("xla", bias, q, k, v)
  layouts = ["any", "right"] if name != "padding_holes" else ["any"]
  for key_padding in layouts:
    got = _value_and_grads("cudnn", bias, q, k, v, dpa_implementation="xla", key_padding=key_padding)
    _assert_close(got, want, kind, F32_TOL)


def test_right_padding_layout_is_only_exact_for_right_padding():
  """key_padding="right" trusts the layout: with a hole in a row it computes something else
  (why the default is "any", which sorts keys)."""
  bias, _ = _biases()["padding_holes"]
  q, k, v = _qkv()
  ref = T.attend(q, k, v, bias, impl="xla")
  wrong = T.attend(q, k, v, bias, impl="cudnn", dpa_implementation="xla", key_padding="right")
  assert float(jnp.max(jnp.abs(wrong - ref))) > 1e-2


@pytest.mark.parametrize("name, sharded", [("padding_holes", True), ("relative_position+padding", False)])
def test_pallas_flash_kernel_equals_xla_in_interpret_mode(name, sharded):
  """The Pallas TPU flash kernel (interpret mode on CPU): padding as segment ids, an additive
  bias passed as `ab` / scale, length 13 padded to the 128-tile with hidden keys. float32
  forward and gradients within 1e-5 (measured ~2e-7). Sharded: 2 examples over a 2-device
  `data` axis (the kernel runs per shard under shard_map, as in the train step); unsharded:
  one example with a hole and a padded tail. One head keeps interpretation short."""
  import flax.linen as nn
  from jax.experimental.pallas import tpu as pltpu
  from jax.sharding import NamedSharding, PartitionSpec as P
  b = 2 if sharded else 1
  bias, kind = _biases(b=b, h=1)[name]
  q, k, v = _qkv(b=b, h=1)
  want = _value_and_grads("xla", bias, q, k, v)
  if not sharded:
    with pltpu.force_tpu_interpret_mode():
      got = _value_and_grads("pallas", bias, q, k, v)
  else:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",),
                             axis_types=(jax.sharding.AxisType.Auto,))
    rules = (("act_batch", "data"), ("act_heads", None))

    def f(q, k, v, bias):
      with nn.logical_axis_rules(rules):
        return jnp.sum(jnp.sin(T.attend(q, k, v, bias, impl="pallas")))

    with jax.set_mesh(mesh), pltpu.force_tpu_interpret_mode():
      sh = NamedSharding(mesh, P("data"))
      got = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)), in_shardings=(sh,) * 4)(q, k, v, bias)
  _assert_close(got, want, kind, F32_TOL)


@pytest.mark.parametrize("name", ["padding_holes", "relative_position+padding"])
def test_bf16_xla_path_close_to_float32(name):
  """bf16 XLA path (softmax_lowp): within bf16 rounding of the float32 reference, forward
  (max abs error <= 2e-2 on outputs of size ~1) and gradients (<= 3e-2 relative to the
  largest entry)."""
  bias, kind = _biases()[name]
  q, k, v = _qkv()
  want = _value_and_grads("xla", bias, q, k, v)
  got = _value_and_grads("xla", bias, *(x.astype(jnp.bfloat16) for x in (q, k, v)))
  out32 = T.attend(q, k, v, bias, impl="xla")
  out16 = T.attend(*(x.astype(jnp.bfloat16) for x in (q, k, v)), bias, impl="xla")
  assert float(jnp.max(jnp.abs(out16.astype(jnp.float32) - out32))) <= 2e-2
  for a, b in zip(got[1], want[1]):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.max(np.abs(a - b)) <= 3e-2 * np.max(np.abs(b)), name


def _residual_shapes(dtype):
  from jax._src.ad_checkpoint import saved_residuals   # not re-exported publicly in jax 0.10
  bias, _ = _biases()["relative_position+padding"]
  q, k, v = _qkv(dtype)
  f = lambda q, k, v: jnp.sum(T.attend(q, k, v, bias, impl="xla").astype(jnp.float32))
  return [(tuple(a.shape), a.dtype) for a, _ in saved_residuals(f, q, k, v)]


def test_bf16_xla_path_keeps_no_float32_score_tensor():
  """What the backward pass keeps: in bf16 only bf16 [B, H, T, T] tensors (the probabilities);
  float32 (unchanged reference) keeps float32 ones."""
  scores = (B, H, L, L)
  bf16 = _residual_shapes(jnp.bfloat16)
  assert (scores, jnp.dtype(jnp.bfloat16)) in bf16
  assert not [r for r in bf16 if r[0] == scores and r[1] == jnp.float32], bf16
  assert (scores, jnp.dtype(jnp.float32)) in _residual_shapes(jnp.float32)


F = T.AttentionFeatures


@pytest.mark.parametrize("platform, features, want", [
    # GPU: cuDNN for bf16 / fp16 without dropout, with padding or one shared bias
    ("gpu", F("padding", False, "bfloat16", 64), "cudnn"),
    ("gpu", F("none", False, "float16", 64), "cudnn"),
    ("gpu", F("shared", False, "bfloat16", 64), "cudnn"),
    ("gpu", F("per_example", False, "bfloat16", 64), "xla"),
    ("gpu", F("padding", True, "bfloat16", 64), "xla"),     # attention dropout
    ("gpu", F("padding", False, "float32", 64), "xla"),     # float32
    ("gpu", F("padding", False, "bfloat16", 160), "xla"),   # head dim > 128
    ("gpu", F("padding", False, "bfloat16", 20), "xla"),    # head dim not a multiple of 8
    # TPU: Pallas flash without dropout and without an additive bias (any dtype)
    ("tpu", F("padding", False, "bfloat16", 64), "pallas"),
    ("tpu", F("none", False, "float32", 64), "pallas"),
    ("tpu", F("shared", False, "bfloat16", 64), "xla"),
    ("tpu", F("per_example", False, "bfloat16", 64), "xla"),
    ("tpu", F("padding", True, "bfloat16", 64), "xla"),
    # elsewhere: XLA
    ("cpu", F("none", False, "bfloat16", 64), "xla"),
    ("rocm", F("none", False, "bfloat16", 64), "xla"),
])
def test_auto_picks_the_documented_implementation(platform, features, want):
  impl, why = T.select_attention("auto", platform, features)
  assert impl == want, why
  assert why


def test_explicit_choices_and_errors():
  ok = F("padding", False, "bfloat16", 64)
  assert T.select_attention("xla", "gpu", ok)[0] == "xla"
  assert T.select_attention("xla", "cpu", F("per_example", True, "float32", 7))[0] == "xla"
  assert T.select_attention("cudnn", "gpu", ok)[0] == "cudnn"
  # Pallas takes an additive bias when asked for explicitly (auto avoids it).
  assert T.select_attention("pallas", "tpu", F("shared", False, "bfloat16", 64))[0] == "pallas"
  with pytest.raises(ValueError, match="attention=cudnn needs a GPU"):
    T.select_attention("cudnn", "cpu", ok)
  with pytest.raises(ValueError, match="attention_dropout=0 allows fused kernels"):
    T.select_attention("cudnn", "gpu", F("padding", True, "bfloat16", 64))
  with pytest.raises(ValueError, match="does not support dtype float32"):
    T.select_attention("cudnn", "gpu", F("padding", False, "float32", 64))
  with pytest.raises(ValueError, match="attention=pallas needs a TPU"):
    T.select_attention("pallas", "gpu", ok)
  with pytest.raises(ValueError, match="use one of"):
    T.select_attention("flash", "gpu", ok)


def test_describe_attention_names_teacher_and_student_choice():
  spec = T.EncoderSpec(num_layers=2, hidden=768, heads=12, mlp_dim=3072, attention_dropout=0.1,
                       dtype=jnp.bfloat16)
  line = attention.describe_attention(spec, "gpu", bias="padding")
  assert line.startswith("attention=auto on gpu (bfloat16, head dim 64): teacher cudnn")
  assert "student xla" in line and "attention_dropout=0" in line
  assert "student pallas" in attention.describe_attention(
      T.EncoderSpec(2, 768, 12, 3072, attention_dropout=0.0, dtype=jnp.bfloat16), "tpu", bias="padding")
  assert "teacher xla" in attention.describe_attention(spec, "tpu", bias="shared")
  both = attention.describe_attention(spec, "tpu")      # no bias kind given: per kind where they differ
  assert "pallas for none/padding bias" in both and "xla for shared/per_example bias" in both
  assert "teacher xla" in attention.describe_attention(spec, "cpu")


def test_encoder_with_pallas_equals_xla_encoder():
  """A whole (one-layer, float32) encoder with attention=pallas on a pretend TPU (interpret
  mode) gives the XLA encoder's output and parameter gradients to 1e-5; attention=cudnn off
  a GPU is an error."""
  from jax.experimental.pallas import tpu as pltpu
  base = T.EncoderSpec(num_layers=1, hidden=32, heads=1, mlp_dim=64, dropout=0.0,
                       attention_dropout=0.0, attention="xla", scan=False)
  x = jnp.asarray(np.random.default_rng(3).standard_normal((1, L, 32)), jnp.float32)
  bias, _ = _biases(b=1, h=1)["padding_holes"]
  params = T.Encoder(base).init(jax.random.PRNGKey(0), x, bias, True)

  def loss(spec):
    def f(p):
      final, layers = T.Encoder(spec).apply(p, x, bias, True)
      return jnp.sum(jnp.sin(final)) + jnp.sum(layers ** 2)
    return jax.jit(jax.value_and_grad(f))(params)

  want = loss(base)
  with pltpu.force_tpu_interpret_mode():
    got = loss(T.EncoderSpec(**{**base.__dict__, "attention": "pallas", "platform": "tpu"}))
  np.testing.assert_allclose(got[0], want[0], rtol=F32_TOL)
  for a, b in zip(jax.tree_util.tree_leaves(got[1]), jax.tree_util.tree_leaves(want[1])):
    np.testing.assert_allclose(a, b, rtol=F32_TOL, atol=F32_TOL)
  with pytest.raises(ValueError, match="attention=cudnn needs a GPU"):
    T.Encoder(T.EncoderSpec(**{**base.__dict__, "attention": "cudnn"})).apply(params, x, bias, True)
