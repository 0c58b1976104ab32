"""Reading fairseq checkpoint files.

A fairseq checkpoint is a torch pickle: {"cfg": {"model": ..., "task": ..., ...}, "model":
state_dict, ...}; the cfg is an OmegaConf DictConfig in files fairseq wrote (plain dicts are
read too) and older 1.0 files carry an argparse Namespace under "args" instead. The EMA
teacher sits inside the state dict as a nested dict ("_ema", "encoder._ema"). Loading a
pickle runs code it names: import only checkpoints you trust (torch.load weights_only=False;
fairseq's own loader does the same).
"""

from __future__ import annotations

import os

import numpy as np

from d2v_jax.config import ConfigError


def plain(cfg):
  """OmegaConf / Namespace / dict -> plain dict with interpolations resolved where possible."""
  if cfg is None:
    return {}
  if isinstance(cfg, dict):
    return {k: plain(v) if isinstance(v, dict) else v for k, v in cfg.items()}
  # omegaconf comes with the fairseq checkpoints that pickle it (requirements.txt)
  from omegaconf import DictConfig, OmegaConf
  if isinstance(cfg, DictConfig):
    try:
      return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    except Exception:   # an interpolation into a section the file lacks: keep it unresolved
      return OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
  return dict(vars(cfg))


def _numpy(state: dict) -> dict:
  out = {}
  for k, v in state.items():
    if isinstance(v, dict):
      out[k] = _numpy(v)
    elif hasattr(v, "detach"):
      out[k] = v.detach().float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy()
    else:
      out[k] = np.asarray(v)
  return out


def read(path: str) -> tuple[dict, dict]:
  """(model cfg as a plain dict, state dict as numpy incl. the EMA dict). One-line errors."""
  if not os.path.isfile(path):
    raise ConfigError(f"fairseq checkpoint {path!r} does not exist (give the .pt file)")
  import torch  # fairseq checkpoints are torch pickles (torch is in requirements.txt)
  try:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
  except Exception as e:
    raise ConfigError(f"{path!r} is not a readable fairseq checkpoint ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
  if not isinstance(ckpt, dict) or "model" not in ckpt:
    raise ConfigError(f"{path!r} is not a fairseq checkpoint (no 'model' state dict)")
  cfg = ckpt.get("cfg")
  if cfg is not None:
    model_cfg = plain(cfg).get("model") or {}
  elif ckpt.get("args") is not None:   # fairseq 1.0-era files: a flat argparse Namespace
    model_cfg = plain(ckpt["args"])
    model_cfg.setdefault("_name", model_cfg.get("arch"))
  else:
    raise ConfigError(f"{path!r} has neither 'cfg' nor 'args': no model config to build from")
  return model_cfg, _numpy(ckpt["model"])
