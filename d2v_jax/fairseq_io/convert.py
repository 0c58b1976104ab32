"""fairseq state dict <-> our parameter trees (student, EMA teacher), driven by a Layout.

`from_state` checks every weight's name and shape before anything is built: a weight fairseq
has and we do not place (and that the layout does not ignore), or one we need and the file
lacks, is a ConfigError naming them. The teacher is read from the checkpoint's EMA dict:
fairseq keeps there the averaged weights *and* copies of what it shares with the student,
so the teacher's full tree is the student's state with the EMA entries laid over it, from
which our teacher keeps the subtrees of `teacher.ema_subtrees`.
"""

from __future__ import annotations

import re

import jax
import numpy as np

from d2v_jax import ema as ema_lib
from d2v_jax.config import ConfigError
from d2v_jax.fairseq_io.layouts import Layout
from d2v_jax.hf import common as hf_common
from d2v_jax.hf.common import get_path, layer_list, put_path, set_layers

# fairseq's learned ALiBi scale is [1, 1, H, 1, 1] (one per head, all layers); ours is [H].
_ALIBI = (lambda x: x.reshape(1, 1, -1, 1, 1), lambda x: x.reshape(-1))
KINDS = {**hf_common.KINDS, "alibi": ((None, None, None, _ALIBI),)}


def entries(layout: Layout):
  """(fairseq module, block index or None, our path, kind) of every module of the layout."""
  for name, path, kind in layout.top:
    yield name, None, path, kind
  for i in range(layout.num_layers):
    for name, path, kind in layout.block:
      yield f"{layout.layer_name(i)}.{name}", i, path, kind


# Fused attention projections (layouts.py): one [3D, D] weight for our query / key / value.
_FUSED = ("qkv", "qkv_qv")


def _fused_names(name: str, kind: str) -> tuple[str, ...]:
  if kind == "qkv":
    return (f"{name}.weight", f"{name}.bias")
  return (f"{name}.qkv.weight", f"{name}.q_bias", f"{name}.v_bias")


def _leaves(name: str, path: tuple, kind: str):
  """(fairseq weight name, our leaf path, (to fairseq, from fairseq)) of one module."""
  if kind in _FUSED:
    return [(n, path, None) for n in _fused_names(name, kind)]
  return [hf_common._leaf_names(name, path, suffix, leaf) + (conv,)
          for suffix, leaf, _, conv in KINDS[kind]]


def expected(layout: Layout, shapes: dict) -> dict[str, tuple]:
  """fairseq weight name -> shape, for our model of these param `shapes`."""
  zeros = jax.tree_util.tree_map(lambda s: np.zeros(s, np.float32), shapes,
                                 is_leaf=lambda x: isinstance(x, tuple))
  blocks = layer_list(zeros["encoder"])
  out = {}
  for name, i, path, kind in entries(layout):
    root = zeros if i is None else blocks[i]
    if kind in _FUSED:
      d_in, d_out = get_path(root, path + ("query", "kernel")).shape
      names = _fused_names(name, kind)
      out[names[0]] = (3 * d_out, d_in)
      for n in names[1:]:
        out[n] = (3 * d_out,) if kind == "qkv" else (d_out,)
      continue
    for fs_name, ours, (to_fs, _) in _leaves(name, path, kind):
      out[fs_name] = tuple(to_fs(get_path(root, ours)).shape)
  return out


def _check(layout: Layout, state: dict, want: dict, strict_extra: bool) -> None:
  missing = [n for n in want if n not in state]
  if missing:
    raise ConfigError(f"fairseq {layout.name} checkpoint lacks {len(missing)} weight(s) this "
                      f"config needs: {missing[:4]}{' ...' if len(missing) > 4 else ''}; check "
                      "the architecture keys (model.encoder.*, v2.decoder.*)")
  bad = [f"{n} {tuple(np.shape(state[n]))} != {want[n]}" for n in want
         if tuple(np.shape(state[n])) != want[n]]
  if bad:
    raise ConfigError(f"fairseq {layout.name} weight shapes disagree with this config: "
                      f"{bad[:3]}{' ...' if len(bad) > 3 else ''}")
  if strict_extra:
    skip = [re.compile(p) for p in layout.ignore]
    extra = sorted(n for n in state if n not in want and n != layout.ema_key
                   and not any(p.match(n) for p in skip))
    if extra:
      raise ConfigError(f"fairseq {layout.name} checkpoint has {len(extra)} weight(s) with no "
                        f"place in our model: {extra[:4]}{' ...' if len(extra) > 4 else ''}")


def from_state(layout: Layout, state: dict, shapes: dict, scan: bool,
               strict_extra: bool = True) -> dict:
  """fairseq state dict (numpy) -> our params (numpy; layers stacked when `scan`). Weights our
  model has and fairseq lacks (layout.fill) are zeros: the token-type embedding (fairseq has
  none) and the 1.0 mask token / embedding of a 2.0 model (unused by the 2.0 student)."""
  want = expected(layout, shapes)
  _check(layout, state, want, strict_extra)
  out: dict = {}
  blocks: list[dict] = [{} for _ in range(layout.num_layers)]
  for name, i, path, kind in entries(layout):
    root = out if i is None else blocks[i]
    if kind in _FUSED:
      names = _fused_names(name, kind)
      w = np.asarray(state[names[0]], np.float32)
      d = w.shape[0] // 3
      for j, part in enumerate(("query", "key", "value")):
        put_path(root, path + (part, "kernel"), np.ascontiguousarray(w[j * d:(j + 1) * d].T))
      if kind == "qkv":
        b = np.asarray(state[names[1]], np.float32)
        for j, part in enumerate(("query", "key", "value")):
          put_path(root, path + (part, "bias"), b[j * d:(j + 1) * d].copy())
      else:   # BEiT: q and v biases, no k bias
        put_path(root, path + ("query", "bias"), np.asarray(state[names[1]], np.float32).copy())
        put_path(root, path + ("value", "bias"), np.asarray(state[names[2]], np.float32).copy())
      continue
    for fs_name, ours, (_, from_fs) in _leaves(name, path, kind):
      put_path(root, ours, np.ascontiguousarray(from_fs(np.asarray(state[fs_name], np.float32))))
  for path in layout.fill:
    put_path(out, path, np.zeros(get_path(shapes, path), np.float32))
  out["encoder"] = set_layers(out.get("encoder", {}), blocks, scan)
  return out


def to_state(layout: Layout, params: dict, fold: bool = True) -> dict[str, np.ndarray]:
  """Our params -> the fairseq state dict (float32 numpy). Our token-type embedding (one row,
  added to every token) is folded into fairseq's position embeddings, which are also added
  to every token (`fold`; off to map gradients); the other `fill` weights are not fairseq's
  and are left out."""
  params = hf_common.unbox(params)
  blocks = layer_list(params["encoder"])
  out: dict[str, np.ndarray] = {}
  for name, i, path, kind in entries(layout):
    root = params if i is None else blocks[i]
    if kind in _FUSED:
      parts = [get_path(root, path + (p,)) for p in ("query", "key", "value")]
      names = _fused_names(name, kind)
      out[names[0]] = np.concatenate([np.asarray(p["kernel"], np.float32).T for p in parts])
      if kind == "qkv":
        out[names[1]] = np.concatenate([np.asarray(p["bias"], np.float32) for p in parts])
      else:
        out[names[1]] = np.asarray(parts[0]["bias"], np.float32)
        out[names[2]] = np.asarray(parts[2]["bias"], np.float32)
      continue
    for fs_name, ours, (to_fs, _) in _leaves(name, path, kind):
      out[fs_name] = np.ascontiguousarray(to_fs(np.asarray(get_path(root, ours), np.float32)))
  if fold and ("embed", "token_type", "embedding") in layout.fill:
    pos = next(f"{n}.weight" for n, _, p, _ in entries(layout) if p == ("embed", "position"))
    out[pos] = out[pos] + np.asarray(params["embed"]["token_type"]["embedding"], np.float32)[0]
  return out


def teacher_from_state(layout: Layout, state: dict, shapes: dict, scan: bool,
                       subtrees) -> dict | None:
  """Our teacher tree from the checkpoint's EMA dict, or None when the file has none."""
  ema = state.get(layout.ema_key)
  if not isinstance(ema, dict) or not ema:
    return None
  merged = dict(state)
  merged.update({layout.ema_prefix + k: v for k, v in ema.items()})
  full = from_state(layout, merged, shapes, scan, strict_extra=False)
  return ema_lib.teacher_view(full, tuple(subtrees))


def teacher_to_state(layout: Layout, params: dict, teacher: dict) -> dict[str, np.ndarray]:
  """The EMA dict fairseq keeps for our teacher (keys relative to layout.ema_prefix): our
  teacher's subtrees over the student, restricted to what fairseq's teacher holds."""
  full = ema_lib.teacher_params(hf_common.unbox(params), hf_common.unbox(teacher))
  state = to_state(layout, full)
  n = len(layout.ema_prefix)
  return {k[n:]: v for k, v in state.items() if layout.ema_scope(k)}
