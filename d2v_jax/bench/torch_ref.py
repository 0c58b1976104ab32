"""A PyTorch data2vec step written the way a PyTorch user would, for the step benchmark.

Student = the Hugging Face `Data2VecText/Vision/AudioModel` + a regression head; teacher = a
deep copy of the student whose EMA subtrees (cfg.teacher.ema_subtrees, mapped to the HF
modules below) are averaged after the optimizer step while every other parameter is the
student's own tensor (shared, as fairseq shares embeddings / the conv front end). The teacher
runs in eval mode under no_grad; the top-K per-layer outputs come from forward hooks (FFN
output before the residual, fairseq `layer_result`) or from `output_hidden_states` (end of
block, data2vec_vision). Targets, loss, AdamW (+ global-norm clip) and the lr schedule follow
our config, so the work equals d2v_jax.step.train_step. As in fairseq, the head and loss only
see the masked positions (x[mask]).

Weights come from our parameter tree via d2v_jax/hf/<modality>.py `to_hf_state`, so
`loss(step 0)` here and in our jitted step agree on the same batch (tests/test_bench.py).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from d2v_jax import ema as ema_lib, optim
from d2v_jax.data.masking_audio import conv_output_length
from d2v_jax.hf import common as hf_common
from d2v_jax.modality import load as load_modality

# Our EMA subtree name -> HF module attribute paths it covers (per modality).
EMA_MODULES = {
    "text": {"encoder": ["encoder"], "embed": ["embeddings"]},
    "vision": {"encoder": ["encoder", "layernorm"], "embed": ["embeddings"]},
    "audio": {"encoder": ["encoder.layer_norm", "encoder.layers"],
              "embed": ["feature_extractor", "feature_projection", "encoder.pos_conv_embed",
                        "masked_spec_embed"],
              "embed/pos_conv_*": ["encoder.pos_conv_embed"]},
}


def _set_param(module, name: str, param) -> None:
  *parents, leaf = name.split(".")
  for p in parents:
    module = getattr(module, p)
  setattr(module, leaf, param)


# The PyTorch base class of each modality's HF family, and whether it takes add_pooling_layer.
HF_MODELS = {"text": ("Data2VecTextModel", True), "vision": ("Data2VecVisionModel", True),
             "audio": ("Data2VecAudioModel", False)}


def hf_model(cfg, state: dict[str, np.ndarray]):
  """The HF base model of cfg.modality holding `state` (bare torch names)."""
  m = cfg.modality
  if m not in HF_MODELS:
    raise ValueError(f"no PyTorch reference for modality {m!r}")
  name, pooling = HF_MODELS[m]
  model = getattr(transformers, name)(load_modality(m).hf().hf_config(cfg),
                                      **({"add_pooling_layer": False} if pooling else {}))
  state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()
           if not k.startswith("pooler.")}
  missing, unexpected = model.load_state_dict(state, strict=False)
  missing = [k for k in missing if "position_ids" not in k]
  if missing or unexpected:
    raise ValueError(f"{m}: HF model does not match our weights: missing {missing[:4]}, "
                     f"unexpected {unexpected[:4]}")
  return model


def to_hf_state(params, cfg) -> dict[str, np.ndarray]:
  return hf_common.to_hf_state(load_modality(cfg.modality).hf(), params, cfg)


class Head(torch.nn.Module):
  """Our RegressionHead: Linear, or Linear -> GELU -> Linear."""

  def __init__(self, head_params: dict, layers: int):
    super().__init__()
    mods = []
    for i in range(layers - 1):
      mods += [self._linear(head_params[f"dense_{i}"]), torch.nn.GELU()]
    mods.append(self._linear(head_params["out"]))
    self.net = torch.nn.Sequential(*mods)

  @staticmethod
  def _linear(p: dict) -> torch.nn.Linear:
    k = np.asarray(p["kernel"], np.float32)
    lin = torch.nn.Linear(k.shape[0], k.shape[1])
    with torch.no_grad():
      lin.weight.copy_(torch.from_numpy(k.T.copy()))
      lin.bias.copy_(torch.from_numpy(np.array(p["bias"], np.float32)))
    return lin

  def forward(self, x):
    return self.net(x)


def _instance_norm(x, valid):
  """x [L, B, T, D]; each channel over time with padded steps excluded (d2v_jax.targets)."""
  w = valid[None, :, :, None].to(x.dtype)
  n = w.sum(-2, keepdim=True).clamp_min(1.0)
  mean = (x * w).sum(-2, keepdim=True) / n
  var = ((x - mean).square() * w).sum(-2, keepdim=True) / n
  return (x - mean) * torch.rsqrt(var + 1e-5) * w


def _norm(kind: str, x, valid):
  if kind == "layer":
    return F.layer_norm(x, x.shape[-1:])
  if kind == "instance":
    if x.dim() == 3:
      return _instance_norm(x[None], valid)[0]
    return _instance_norm(x, valid)
  return x


def _lr_table(cfg) -> np.ndarray:
  _, lr_fn = optim.make(cfg.optim, cfg.total_steps)
  return np.asarray(lr_fn(np.arange(cfg.total_steps + 1)), np.float64)


class TorchData2Vec:
  """One data2vec training step in PyTorch; `step(batch) -> loss` (float)."""

  def __init__(self, cfg, params, dtype: str = "float32"):
    self.cfg = cfg
    self.modality = cfg.modality
    self.n_extra = 1 if cfg.modality == "vision" else 0
    self.student = hf_model(cfg, to_hf_state(params, cfg))
    self.head = Head(params["head"], cfg.head.layers)
    self.teacher = copy.deepcopy(self.student)
    ema_paths = [p for sub in cfg.teacher.ema_subtrees for p in EMA_MODULES[cfg.modality][sub]]
    self.ema_pairs = []   # (teacher param, student param)
    self.ema_names = []   # their HF names
    for path, p in list(self.student.named_parameters()):
      if any(path == e or path.startswith(e + ".") for e in ema_paths):
        self.ema_pairs.append((_get_param(self.teacher, path), p))
        self.ema_names.append(path)
      else:
        _set_param(self.teacher, path, p)   # shared with the student: read live
    self.teacher.eval()
    for t, _ in self.ema_pairs:
      t.requires_grad_(False)
    self.autocast = dtype == "bfloat16"
    self.hooks_out: list = []
    self.collect = cfg.target.layer_output
    if self.collect == "ffn":
      for layer in self._layers(self.teacher):
        ffn_out = layer.output.dense if self.modality == "text" else layer.feed_forward.output_dense
        ffn_out.register_forward_hook(lambda mod, inp, out: self.hooks_out.append(out))
    params_all = list(self.student.parameters()) + list(self.head.parameters())
    o = cfg.optim
    decay, no_decay = [], []
    for name, p in list(self.student.named_parameters()) + [("head." + n, p) for n, p in
                                                           self.head.named_parameters()]:
      skip = any(s in name for s in _torch_no_decay(o)) or (not o.decay_1d and p.dim() < 2)
      (no_decay if skip else decay).append(p)
    self.params = params_all
    self.lrs = _lr_table(cfg)
    self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}],
                                 lr=float(self.lrs[0]), betas=(o.b1, o.b2), eps=o.eps)
    self.num_steps = 0
    self.student.train()
    self.head.train()

  @staticmethod
  def _layers(model):
    enc = model.encoder
    return enc.layer if hasattr(enc, "layer") else enc.layers

  def _inputs(self, batch: dict, student: bool) -> dict:
    if self.modality == "text":
      ids = torch.from_numpy(np.asarray(batch["student" if student else "source"], np.int64))
      return {"input_ids": ids, "attention_mask": (ids != self.cfg.model.pad_id).long()}
    if self.modality == "vision":
      img = torch.from_numpy(np.ascontiguousarray(np.asarray(batch["image"], np.float32).transpose(0, 3, 1, 2)))
      out = {"pixel_values": img}
      if student:
        out["bool_masked_pos"] = torch.from_numpy(np.asarray(batch["mask"], bool))
      return out
    audio = torch.from_numpy(np.asarray(batch["audio"], np.float32))
    lengths = np.asarray(batch.get("audio_len", np.full(audio.shape[:1], audio.shape[1])))
    att = torch.from_numpy(np.arange(audio.shape[1])[None, :] < lengths[:, None]).long()
    out = {"input_values": audio, "attention_mask": att}
    if student:
      out["mask_time_indices"] = torch.from_numpy(np.asarray(batch["mask"], bool))
    return out

  def _frame_valid(self, batch, t: int):
    if self.modality != "audio":
      return None
    m = self.cfg.model
    lengths = np.asarray(batch.get("audio_len", np.full((batch["audio"].shape[0],), batch["audio"].shape[1])))
    frames = np.asarray(conv_output_length(lengths, tuple(m.conv_kernels), tuple(m.conv_strides)))
    return torch.from_numpy(np.arange(t)[None, :] < frames[:, None])

  def targets(self, batch):
    """Teacher targets [B, T', D] (float32) on the unmasked input."""
    tc = self.cfg.target
    self.hooks_out.clear()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=self.autocast):
      out = self.teacher(**self._inputs(batch, student=False),
                         output_hidden_states=self.collect == "end")
      layers = self.hooks_out if self.collect == "ffn" else out.hidden_states[1:]
      top = torch.stack([h.float() for h in layers[-tc.top_k:]])[:, :, self.n_extra:]
      valid = self._frame_valid(batch, top.shape[2])
      y = _norm(tc.layer_norm, top, valid).mean(0)
      y = _norm(tc.final_norm, y, valid)
    self.hooks_out.clear()
    return y

  def loss(self, batch, y):
    lc = self.cfg.loss
    mask = torch.from_numpy(np.asarray(batch["mask"], bool))
    with torch.autocast("cpu", torch.bfloat16, enabled=self.autocast):
      x = self.student(**self._inputs(batch, student=True)).last_hidden_state[:, self.n_extra:]
      pred = self.head(x[mask]).float()
    target = y[mask]
    if lc.beta == 0:
      per = (pred - target).square()
    else:
      per = F.smooth_l1_loss(pred, target, reduction="none", beta=lc.beta)
    d = pred.shape[-1]
    if lc.reduce_dims == "sum":
      per = per.sum(-1) * (d ** -0.5 if lc.scale is None else lc.scale)
    else:
      per = per.mean(-1) * (1.0 if lc.scale is None else lc.scale)
    return per.sum() / max(int(mask.sum()), 1)

  def step(self, batch) -> float:
    y = self.targets(batch)
    loss = self.loss(batch, y)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    if self.cfg.optim.clip > 0:
      torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.clip)
    self.opt.step()
    # fairseq steps the EMA after set_num_updates(n + 1): tau of the count including this update
    tau = float(ema_lib.tau_from_config(self.num_steps + 1, self.cfg.teacher))
    with torch.no_grad():
      t = [a for a, _ in self.ema_pairs]
      s = [b for _, b in self.ema_pairs]
      torch._foreach_mul_(t, tau)
      torch._foreach_add_(t, s, alpha=1.0 - tau)
    self.num_steps += 1
    for g in self.opt.param_groups:
      g["lr"] = float(self.lrs[min(self.num_steps, len(self.lrs) - 1)])
    return float(loss.detach())


  def named_state(self) -> dict[str, dict[str, np.ndarray]]:
    """The state after the steps so far, by HF name ('head.net.0.weight' for the head):
    student params, the teacher's EMA params, and AdamW's first / second moments."""
    named = list(self.student.named_parameters()) + [("head." + n, p) for n, p in
                                                    self.head.named_parameters()]
    np_ = lambda t: t.detach().numpy().copy()
    out = {"params": {n: np_(p) for n, p in named},
           "teacher": {n: np_(t) for n, (t, _) in zip(self.ema_names, self.ema_pairs)}}
    for key, ours in (("exp_avg", "mu"), ("exp_avg_sq", "nu")):
      out[ours] = {n: np_(self.opt.state[p][key]) for n, p in named if p in self.opt.state}
    return out


def as_torch_names(tree, cfg) -> dict[str, np.ndarray]:
  """A tree shaped like our params (params, an Adam moment) -> HF names and layouts, the
  regression head as `Head` holds it (head.net.{2i}.weight / .bias)."""
  out = to_hf_state(tree, cfg)
  head = hf_common.unbox(tree["head"])
  names = [f"dense_{i}" for i in range(cfg.head.layers - 1)] + ["out"]
  for i, name in enumerate(names):
    out[f"head.net.{2 * i}.weight"] = np.asarray(head[name]["kernel"], np.float32).T
    out[f"head.net.{2 * i}.bias"] = np.asarray(head[name]["bias"], np.float32)
  return out


def _get_param(module, name: str):
  *parents, leaf = name.split(".")
  for p in parents:
    module = getattr(module, p)
  return getattr(module, leaf)


def _torch_no_decay(o) -> tuple[str, ...]:
  """optim.no_decay substrings (our names) -> HF torch names."""
  alias = {"norm": ("LayerNorm", "layernorm", "layer_norm"), "rel_pos_bias": ("relative_position_bias",),
           "lambda_": ("lambda_",), "bias": ("bias",), "cls_token": ("cls_token",),
           "mask_token": ("mask_token",)}
  out: list[str] = []
  for n in o.no_decay:
    out += list(alias.get(n, (n,)))
  return tuple(out)
