"""BEiT embedder for data2vec-vision (docs/algorithm.md §2.2, HF layout §5.2).

Image [B, H, W, C] (NHWC, normalised) -> non-overlapping p x p patches projected to D (a
stride-p convolution, kernel (p, p, C, D) = HF `patch_embeddings.projection.weight`
[D, C, p, p] transposed) -> the student's masked patches (batch["mask"] [B, num_patches])
replaced by a learned mask token -> a learned CLS token in front (num_extra_tokens = 1).
No absolute position embedding: position enters through one relative position bias table
shared by all layers (BEiT `use_shared_rel_pos_bias`), returned as the attention bias
[1, heads, T, T] with T = 1 + num_patches, indexed exactly as BEiT / HF
`generate_relative_position_index` (including the CLS->patch, patch->CLS and CLS->CLS entries).

Options for fairseq data2vec 2.0's ViT (model.rel_pos_bias=False, model.pos_embed="sincos"):
no relative bias, and fixed 2-D sin-cos position embeddings (MAE's table, as fairseq builds
it) added to the patch embeddings before masking; the rest of that ViT (post-LN blocks, a
LayerNorm on [CLS; patches]) is the encoder's config.

The teacher (data2vec_vision) is an EMA of all of this (config teacher.ema_subtrees has
"embed"); it sees the same image without the mask token.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d2v_jax.models.transformer import constrain
from d2v_jax.models.visible import gather_bias, gather_tokens, with_extra

# The attention bias kind (transformer.BIAS_KINDS) this embedder returns: shared (one table per batch).
# The trainer's start-up line names the attention implementation chosen for it.
ATTENTION_BIAS = "shared"


# data2vec_vision's trunc_normal_(std=0.02) truncates at +-1 std (a=-std, b=std): the drawn
# values have std ~0.0108. Used for the CLS / mask tokens, the patch conv and, through
# `beit_init`, every Linear of the encoder and head.
INIT_STD = 0.02
TRUNC_INIT = nn.initializers.truncated_normal(INIT_STD, lower=-1.0, upper=1.0)
TOKEN_INIT = TRUNC_INIT


def relative_position_index(grid_h: int, grid_w: int) -> np.ndarray:
  """int32 [T, T], T = 1 + grid_h * grid_w, into a table of (2h-1)(2w-1) + 3 rows.

  Patch pairs (i, j) use (dy + h - 1) * (2w - 1) + (dx + w - 1) with (dy, dx) = pos_i - pos_j;
  row 0 (CLS as query) uses R - 3, column 0 (CLS as key) R - 2, CLS->CLS R - 1.
  """
  num_rel = (2 * grid_h - 1) * (2 * grid_w - 1) + 3
  yy, xx = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  coords = np.stack([yy.ravel(), xx.ravel()])                  # [2, N]
  rel = coords[:, :, None] - coords[:, None, :]                # [2, N, N]
  idx = (rel[0] + grid_h - 1) * (2 * grid_w - 1) + (rel[1] + grid_w - 1)
  out = np.zeros((grid_h * grid_w + 1,) * 2, np.int32)
  out[1:, 1:] = idx
  out[0, :] = num_rel - 3
  out[:, 0] = num_rel - 2
  out[0, 0] = num_rel - 1
  return out


def sincos_2d(dim: int, grid: int) -> np.ndarray:
  """float32 [grid * grid, dim] fixed positions of row-major patches, in the layout of
  fairseq's (MAE's) get_2d_sincos_pos_embed: the first half of the channels encodes the
  column, the second the row; each half is [sin(p w_k), cos(p w_k)] with
  w_k = 10000^(-k / (dim / 4)), k < dim / 4."""
  if dim % 4:
    raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
  rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64),
                           indexing="ij")

  def half(pos):
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  return np.concatenate([half(cols), half(rows)], axis=1).astype(np.float32)


class VisionEmbed(nn.Module):
  image_size: int
  patch_size: int
  hidden: int
  heads: int
  channels: int = 3
  dropout: float = 0.0
  rel_pos_bias: bool = True   # BEiT's shared relative position bias
  pos_embed: str = "none"     # none | sincos (fairseq data2vec 2.0 ViT)
  dtype: Any = jnp.float32
  num_extra_tokens: int = 1   # the CLS token is never a target

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  def setup(self):
    p, d = self.patch_size, self.hidden
    self.patch = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                         param_dtype=jnp.float32,
                         kernel_init=nn.with_logical_partitioning(TRUNC_INIT, (None, None, None, "embed")),
                         bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))
    # 1-D tokens, so optim's no-decay rules (ndim < 2 / names) see them like BEiT's lists.
    self.cls_token = self.param("cls_token", nn.with_logical_partitioning(TOKEN_INIT, ("embed",)),
                                (d,), jnp.float32)
    self.mask_token = self.param("mask_token", nn.with_logical_partitioning(TOKEN_INIT, ("embed",)),
                                 (d,), jnp.float32)
    if self.rel_pos_bias:
      num_rel = (2 * self.grid - 1) ** 2 + 3
      self.rel_pos_table = self.param(
          "rel_pos_bias", nn.with_logical_partitioning(nn.initializers.zeros, (None, "heads")),
          (num_rel, self.heads), jnp.float32)
    if self.pos_embed not in ("none", "sincos"):
      raise ValueError(f"model.pos_embed={self.pos_embed!r}: use none or sincos")
    self.drop = nn.Dropout(self.dropout)

  def local(self, batch, *, student: bool = False, deterministic: bool = True):
    """Patch embeddings [B, N, D] of the unmasked image (row-major patches); no padding."""
    del student, deterministic
    g, d = self.grid, self.hidden
    img = batch["image"]
    if img.shape[1:] != (self.image_size, self.image_size, self.channels):
      raise ValueError(f"batch['image'] has shape {img.shape}; the model expects "
                       f"[B, {self.image_size}, {self.image_size}, {self.channels}] (NHWC)")
    x = self.patch(img.astype(self.dtype)).reshape(img.shape[0], g * g, d)
    if self.pos_embed == "sincos":   # before masking, so every kept patch keeps its position
      x = x + jnp.asarray(sincos_2d(d, g), x.dtype)[None]
    return x, None

  def _bias(self):
    if not self.rel_pos_bias:
      return None
    g = self.grid
    t = g * g + 1
    idx = relative_position_index(g, g)
    return self.rel_pos_table[idx.reshape(-1)].reshape(t, t, self.heads).transpose(2, 0, 1)[None]

  def _with_cls(self, x, deterministic: bool):
    cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (x.shape[0], 1, self.hidden))
    x = self.drop(jnp.concatenate([cls, x], axis=1), deterministic=deterministic)
    return constrain(x, "act_batch", "act_length", "act_embed")

  def __call__(self, batch, *, student: bool, deterministic: bool):
    g = self.grid
    x, _ = self.local(batch)
    if student:
      m = batch["mask"]
      if m.shape[1:] != (g * g,):
        raise ValueError(f"batch['mask'] has shape {m.shape}; expected [B, {g * g}] patches")
      x = jnp.where(m[..., None], self.mask_token.astype(x.dtype), x)
    return self._with_cls(x, deterministic), None, self._bias()

  def context(self, x, valid, *, deterministic: bool = True, mask=None):
    """Patch embeddings computed once (teacher.share_local: fairseq's data2vec_vision port
    feeds its teacher the student's patch embeddings) -> mask token on `mask`, CLS in front."""
    del valid
    if mask is not None:
      x = jnp.where(mask[..., None], self.mask_token.astype(x.dtype), x)
    return self._with_cls(x, deterministic), None, self._bias()

  def visible(self, x, valid, mask, visible, *, deterministic: bool):
    """data2vec 2.0 student: the K visible patches, CLS in front, the relative position bias
    gathered on both axes (distances stay those of the full grid)."""
    del valid, mask
    x = self._with_cls(gather_tokens(x, visible), deterministic)
    bias = self._bias()
    if bias is None:
      return x, None, None
    return x, None, gather_bias(bias, with_extra(visible, self.num_extra_tokens))


def beit_init(params: dict, rng: jax.Array) -> dict:
  """data2vec_vision's initialisation of the encoder and head (modeling_cyclical.py):
  every Linear kernel trunc_normal_(std=0.02) truncated at +-1 std, then `fix_init_weight`
  divides block l's (1-based) attention output and fc2 kernels by sqrt(2 l)."""
  flat = flax.traverse_util.flatten_dict(params)
  keys = jax.random.split(rng, len(flat))
  out = {}
  for key, (path, x) in zip(keys, sorted(flat.items())):
    if path[0] in ("encoder", "head") and path[-1] == "kernel":
      x = TRUNC_INIT(key, x.shape, x.dtype)
      if path[0] == "encoder" and (path[-3:] == ("attention", "out", "kernel")
                                   or path[-2:] == ("fc2", "kernel")):
        x = _fix_init(x, path)
    out[path] = x
  return flax.traverse_util.unflatten_dict(out)


def _fix_init(x: jax.Array, path: tuple) -> jax.Array:
  """Scanned stacks carry the layer on axis 0 ('layers'); unscanned ones are 'layers_<i>'."""
  if "layers" in path:
    layer = jnp.arange(1, x.shape[0] + 1, dtype=x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return x / jnp.sqrt(2.0 * layer)
  i = next(int(p.split("_")[1]) for p in path if p.startswith("layers_"))
  return x / np.sqrt(2.0 * (i + 1))


def init_fixup(params: dict, rng: jax.Array, cfg) -> dict:
  """Called by d2v_jax/build.py after model.init: model.init = "beit" (default) applies
  data2vec_vision's initialisation; "bert" keeps the shared N(0, 0.02) Dense init."""
  if cfg.model.init == "beit":
    return beit_init(params, rng)
  return params


def build(cfg) -> VisionEmbed:
  m = cfg.model
  if m.image_size % m.patch_size:
    raise ValueError(f"model.image_size={m.image_size} is not divisible by "
                     f"model.patch_size={m.patch_size}")
  return VisionEmbed(image_size=m.image_size, patch_size=m.patch_size, hidden=m.encoder.hidden,
                     heads=m.encoder.heads, channels=m.channels,
                     dropout=m.embed_dropout, rel_pos_bias=bool(m.rel_pos_bias),
                     pos_embed=str(m.pos_embed), dtype=jnp.dtype(cfg.dtype))
