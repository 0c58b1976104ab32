"""BEiT embedder for data2vec-vision (ALGORITHM.md §2.2, HF layout §5.2).

Image [B, H, W, C] (NHWC, normalised) -> non-overlapping p x p patches projected to D (a
stride-p convolution, kernel (p, p, C, D) = HF `patch_embeddings.projection.weight`
[D, C, p, p] transposed) -> the student's masked patches (batch["mask"] [B, num_patches])
replaced by a learned mask token -> a learned CLS token in front (num_extra_tokens = 1).
No absolute position embedding: position enters through one relative position bias table
shared by all layers (BEiT `use_shared_rel_pos_bias`), returned as the attention bias
[1, heads, T, T] with T = 1 + num_patches, indexed exactly as BEiT / HF
`generate_relative_position_index` (including the CLS->patch, patch->CLS and CLS->CLS entries).

The teacher (data2vec_vision) is an EMA of all of this (config teacher.ema_subtrees has
"embed"); it sees the same image without the mask token.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from d2v_jax.models.transformer import constrain

# timm / BEiT trunc_normal_(std=0.02) for the CLS and mask tokens.
TOKEN_INIT = nn.initializers.truncated_normal(0.02)
# PyTorch Conv2d default (kaiming_uniform(a=sqrt(5))): U(+-1/sqrt(fan_in)); BEiT keeps it.
PATCH_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


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


class VisionEmbed(nn.Module):
  image_size: int
  patch_size: int
  hidden: int
  heads: int
  channels: int = 3
  dropout: float = 0.0
  dtype: Any = jnp.float32
  num_extra_tokens: int = 1   # the CLS token is never a target

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @nn.compact
  def __call__(self, batch, *, student: bool, deterministic: bool):
    p, g, d = self.patch_size, self.grid, self.hidden
    img = batch["image"]
    if img.shape[1:] != (self.image_size, self.image_size, self.channels):
      raise ValueError(f"batch['image'] has shape {img.shape}; the model expects "
                       f"[B, {self.image_size}, {self.image_size}, {self.channels}] (NHWC)")
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=jnp.float32, name="patch",
                kernel_init=nn.with_logical_partitioning(PATCH_INIT, (None, None, None, "embed")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(
                    img.astype(self.dtype))
    x = x.reshape(x.shape[0], g * g, d)                        # row-major patch order
    # 1-D tokens, so optim's no-decay rules (ndim < 2 / names) catch them like BEiT's skip list.
    cls = self.param("cls_token", nn.with_logical_partitioning(TOKEN_INIT, ("embed",)), (d,),
                     jnp.float32)
    mask_token = self.param("mask_token", nn.with_logical_partitioning(TOKEN_INIT, ("embed",)),
                            (d,), jnp.float32)
    if student:
      m = batch["mask"]
      if m.shape[1:] != (g * g,):
        raise ValueError(f"batch['mask'] has shape {m.shape}; expected [B, {g * g}] patches")
      x = jnp.where(m[..., None], mask_token.astype(x.dtype), x)
    cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, d))
    x = jnp.concatenate([cls, x], axis=1)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)

    num_rel = (2 * g - 1) ** 2 + 3
    table = self.param("rel_pos_bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                    (None, "heads")),
                       (num_rel, self.heads), jnp.float32)
    idx = relative_position_index(g, g)
    t = g * g + 1
    bias = table[idx.reshape(-1)].reshape(t, t, self.heads).transpose(2, 0, 1)[None]
    return constrain(x, "act_batch", "act_length", "act_embed"), None, bias


def build(cfg) -> VisionEmbed:
  m = cfg.model
  if m.image_size % m.patch_size:
    raise ValueError(f"model.image_size={m.image_size} is not divisible by "
                     f"model.patch_size={m.patch_size}")
  return VisionEmbed(image_size=m.image_size, patch_size=m.patch_size, hidden=m.encoder.hidden,
                     heads=m.encoder.heads, channels=m.channels,
                     dropout=m.get("embed_dropout", 0.0), dtype=jnp.dtype(cfg.dtype))
