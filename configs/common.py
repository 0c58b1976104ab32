"""Pieces every modality config shares.

A config file is `configs/<modality>.py` with `get_config(arg)`; `arg` is the text after
the colon in `--config configs/text.py:variant=base,runlocal`. `parse_arg` turns it into a
dict, `base_config` holds the keys the trainer reads for every modality.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def parse_arg(arg: str | None, **defaults) -> dict:
  """`"variant=base,runlocal"` -> {"variant": "base", "runlocal": True} over `defaults`."""
  out = dict(defaults)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, eq, value = item.partition("=")
    if key not in out:
      raise ValueError(f"unknown config argument {key!r}; valid: {sorted(out)}")
    if not eq:
      out[key] = True
    elif isinstance(out[key], bool):
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      out[key] = type(out[key])(value)
  return out


def encoder(num_layers: int, hidden: int, heads: int, mlp_dim: int, **kw) -> ml_collections.ConfigDict:
  """Transformer stack shape and regularisation; see d2v_jax/models/transformer.py."""
  c = ml_collections.ConfigDict()
  c.num_layers = num_layers
  c.hidden = hidden
  c.heads = heads
  c.mlp_dim = mlp_dim
  c.pre_ln = False          # post-LN (RoBERTa, wav2vec2) vs pre-LN (BEiT)
  c.layer_norm_eps = 1e-5
  c.dropout = 0.1
  c.attention_dropout = 0.1
  c.activation_dropout = 0.0
  c.drop_path = 0.0         # max stochastic-depth rate, linear over depth (BEiT)
  c.layerdrop = 0.0         # whole-layer dropout (wav2vec2 / data2vec-audio)
  c.layer_scale = 0.0       # > 0: BEiT layer scale with this init
  c.key_bias = True         # BEiT has q and v biases but no k bias
  c.input_norm = False      # LayerNorm on the encoder input (audio post-LN encoder)
  c.final_norm = False      # LayerNorm after the last block (pre-LN stacks)
  c.scan = True             # nn.scan over layers: one compiled block, stacked params
  c.remat = "none"          # activation rematerialisation: none | full | dots
  c.scan_unroll = 0         # layers per scan iteration; 0: all of them on CPU (faster there), 1 elsewhere
  c.update(kw)
  return c


def base_config(modality: str) -> ml_collections.ConfigDict:
  """Keys that exist for every modality (the trainer reads only these and model/data)."""
  c = ml_collections.ConfigDict()
  c.modality = modality
  c.seed = 0
  c.total_steps = 1000
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.log_every = 10
  c.batch_size = 256                 # global, across all processes
  c.dtype = "float32"                # compute dtype; params, teacher and optimizer stay float32
  c.export_after = False             # write an HF directory at the end of training

  # Mesh (d2v_jax/sharding.py): explicit sizes (one may be -1) or a preset that sets them:
  # dp (batch only), fsdp (params/teacher/optimizer over fsdp), fsdp_tp (plus tensor=N).
  # dcn_data x dcn_fsdp = number of TPU slices (multislice; -1: the rest).
  c.mesh = ml_collections.ConfigDict(dict(preset="", data=-1, fsdp=1, tensor=1,
                                          dcn_data=-1, dcn_fsdp=1))

  c.teacher = ml_collections.ConfigDict()
  # Top-level parameter subtrees the teacher keeps its own EMA copy of; every other
  # subtree is shared with (read live from) the student, as fairseq does.
  c.teacher.ema_subtrees = ("encoder",)
  c.teacher.tau_start = 0.999
  c.teacher.tau_end = 0.9999
  c.teacher.anneal_steps = 100_000  # linear tau_start -> tau_end, then flat

  c.target = ml_collections.ConfigDict()
  c.target.top_k = 8
  c.target.layer_output = "ffn"      # ffn: FFN output before the residual; end: end of block
  c.target.layer_norm = "layer"      # per-layer norm: layer | instance | none
  c.target.final_norm = "none"       # on the average: layer | instance | none

  c.loss = ml_collections.ConfigDict()
  c.loss.beta = 0.0                  # smooth-L1 beta; 0 = squared error
  c.loss.scale = config_dict.placeholder(float)  # None -> 1/sqrt(dim)
  c.loss.reduce_dims = "sum"         # sum (fairseq) | mean (data2vec_vision)

  c.head = ml_collections.ConfigDict(dict(layers=1, hidden_mult=2))

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.eps = 1e-6
  c.optim.weight_decay = 0.01
  c.optim.decay_1d = True            # decay biases/norms too (fairseq Adam does)
  c.optim.no_decay = ()              # substrings of parameter paths never decayed
  c.optim.clip = 0.0                 # global-norm clip; 0 = off
  c.optim.schedule = "cosine"        # cosine | tri_stage | constant
  c.optim.warmup_steps = 1000
  c.optim.stage_ratios = (0.03, 0.9, 0.07)  # tri_stage warmup / hold / decay
  c.optim.final_lr_scale = 0.0       # cosine end / tri-stage end as a fraction of lr
  c.optim.init_lr_scale = 0.0        # warmup start as a fraction of lr

  c.guards = ml_collections.ConfigDict()
  c.guards.min_target_var = 0.0      # collapse check (fairseq: 0.1 after 5000 updates)
  c.guards.min_pred_var = 0.0
  c.guards.collapse_after = 5000
  c.guards.collapse_policy = "stop"  # warn | stop | rollback (to the last checkpoint before it)
  c.guards.max_nonfinite = 10        # consecutive skipped (non-finite) steps before the policy
  c.guards.nonfinite_policy = "stop"  # stop | rollback (data continues past the bad batches)
  c.guards.max_rollbacks = 3         # rollbacks in one launch before the run stops instead

  c.eval = ml_collections.ConfigDict()
  c.eval.rank_every = 0              # RankMe of student/teacher token features every N steps; 0 = off
  c.eval.probe_every = 0             # linear + k-NN probe on eval.probe_data every N steps; 0 = off
  c.eval.probe_data = ""             # folder per class (images, audio) or text<TAB>label TSV (text)
  c.eval.probe_weights = "student"   # student | teacher
  c.eval.layer = -1                  # block probed / ranked: 1..L, or -1..-L from the end
  c.eval.rank_examples = 64          # examples in the fixed rank batch
  c.eval.probe_chunk = 64            # examples per forward pass
  c.eval.probe_seed = 0              # seed of the stratified split
  c.eval.probe_test_frac = 0.3

  c.init = ml_collections.ConfigDict()
  c.init.hf = ""                     # HF directory a NEW run starts from (d2v_jax/init.py)
  c.init.checkpoint = ""             # run directory whose latest student params start a NEW run

  c.data = ml_collections.ConfigDict()
  return c


def tau_schedule(c: ml_collections.ConfigDict, start: float, end: float, steps: int) -> None:
  c.teacher.tau_start, c.teacher.tau_end, c.teacher.anneal_steps = start, end, steps


def runlocal(c: ml_collections.ConfigDict, steps: int = 300, batch: int = 8) -> None:
  """Shrink the schedule for a laptop / CI run."""
  c.total_steps = steps
  c.checkpoint_every = max(steps // 3, 1)
  c.batch_size = batch
  c.log_every = 10
  c.optim.warmup_steps = max(steps // 10, 1)
