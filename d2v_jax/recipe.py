"""Pieces every recipe (config file) shares: `from d2v_jax import recipe` in configs/<m>.py.

A config file is `configs/<modality>.py` with `get_config(arg)`; `arg` is the text after
the colon in `--config configs/text.py:variant=base,runlocal`. `parse_arg` turns it into a
dict, `base_config` holds the keys the trainer reads for every modality.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def parse_arg(arg: str | None, **defaults) -> dict:
  """`"variant=base,runlocal"` -> {"variant": "base", "runlocal": True} over `defaults`.

  Every config takes `variant`, `runlocal`, `v2` and `fit` (a TPU topology: d2v_jax/fits.py);
  `runlocal` without a variant means the tiny variant (a laptop-sized run), otherwise the
  variant defaults to base."""
  defaults.setdefault("runlocal", False)
  defaults.setdefault("v2", False)
  defaults.setdefault("fit", "")
  variant_default = defaults.get("variant", "base")
  defaults["variant"] = ""
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
  if not out["variant"]:
    out["variant"] = "tiny" if out["runlocal"] else variant_default
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
  # Activation rematerialisation (transformer.remat_policy): none | full | minimal | save_dots
  # (alias dots) | save_qkv_out | offload. `python -m d2v_jax.compile --search_batch --remat all`
  # gives the largest batch per chip for each.
  c.remat = "none"
  c.scan_unroll = 0         # layers per scan iteration; 0: all of them on CPU (faster there), 1 elsewhere
  # Attention implementation (transformer.select_attention): auto | xla | cudnn | pallas. auto =
  # cuDNN fused attention on GPU (bf16), the Pallas flash kernel on TPU, else XLA; attention
  # dropout > 0 always takes XLA, so attention_dropout=0 is how the student gets fused kernels.
  c.attention = "auto"
  # Layout of padded keys ([B,1,1,T] padding bias): any | right (every row's real keys are a
  # prefix, as the text and audio pipelines make them: cuDNN skips a per-layer key sort).
  c.key_padding = "any"
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
  # Resuming (d2v_jax/resume.py, drift.py): refuse when the newest checkpoint is damaged instead
  # of moving it aside and resuming from the newest intact one; the trajectory keys (or
  # sections, e.g. "optim,total_steps") this relaunch may change from the checkpoint's config.
  c.resume_strict = False
  c.resume_allow_changes = ""
  c.batch_size = 256                 # global, across all processes
  c.dtype = "float32"                # compute dtype; params, teacher and optimizer stay float32
  # Training objective (d2v_jax/objectives.py): v1 = data2vec 1.0 (student encodes the whole
  # masked input, regression head); v2 = data2vec 2.0 (M masked clones per example, the
  # student encodes only the visible tokens, a conv decoder predicts the masked ones).
  c.objective = "v1"
  c.v2 = ml_collections.ConfigDict(dict(
      clone_batch=1,         # M masked clones per example; the teacher runs once per example
      mask_prob=0.8,         # R: fraction of positions masked (exact count per row)
      mask_adjust=0.0,       # A: extra block-centre density before the exact-count fix
      mask_length=1,         # B: block size (vision B x B, audio 1-D), 1 = random (text)
      mask_noise_std=0.01,   # decoder input at masked positions: N(0, std) noise
      cls_loss=0.0,          # weight of the extra-token (CLS) loss on the mean target
      decoder=ml_collections.ConfigDict(dict(
          kind="1d",           # 1d: convolve over the sequence | 2d: over the patch grid
          dim=768, kernel=3, groups=16, layers=6, residual=True, proj_layers=1,
          proj_ratio=2.0, input_dropout=0.0,
          proj_init="torch")),   # torch default | bert: N(0, 0.02) (fairseq's text decoder)
  ))

  # Mesh (d2v_jax/sharding.py): explicit sizes (one may be -1) or a preset that sets them:
  # dp (batch only), fsdp (params/teacher/optimizer over fsdp), fsdp_tp (plus tensor=N).
  # dcn_data x dcn_fsdp = number of TPU slices (multislice; -1: the rest).
  c.mesh = ml_collections.ConfigDict(dict(preset="", data=-1, fsdp=1, tensor=1,
                                          dcn_data=-1, dcn_fsdp=1))

  c.teacher = ml_collections.ConfigDict()
  # Top-level parameter subtrees the teacher keeps its own EMA copy of; every other
  # subtree is shared with (read live from) the student, as fairseq does.
  c.teacher.ema_subtrees = ("encoder",)
  # The teacher reads the student's local features (conv front end / embeddings) of the
  # unmasked input instead of computing its own: fairseq audio, data2vec 2.0 text.
  c.teacher.share_local = False
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
  c.optim.decay = ()                 # substrings of parameter paths always decayed (wins)
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
  # Dimensional collapse (docs/evaluation.md): the in-step effective ranks rank_target /
  # rank_pred (eval.step_rank_every; 1 = all targets on one line, D = none correlated),
  # averaged over the last rank_window steps that computed them, below these absolute floors
  # from step rank_after on; 0 = off. Runlocal tiny (D = 64) rank_target: text ~45, vision
  # ~15, audio ~14 (~5-7 when its teacher shared the student's positional conv: features
  # that probed below random init, docs/evaluation.md).
  c.guards.min_target_rank = 8.0
  c.guards.min_pred_rank = 0.0
  c.guards.rank_window = 5
  c.guards.rank_after = 100
  c.guards.rank_policy = "warn"      # warn | stop | rollback (to the last checkpoint before it)

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
  c.eval.step_rank_every = 10        # rank_target / rank_pred in the step every N steps (NaN
                                     # between; lax.cond): 1 = every step (+2-4 % CPU tiny); 0 = off

  # Batch-size scaling (d2v_jax/scaling.py, docs/training.md): a run at another global batch
  # than the recipe's scales lr (sqrt | linear | none), the EMA decays (tau^(B/B0)) and the
  # step counts (same examples) when --config.batch_size is given (or apply=True). Each recipe
  # sets reference_batch = its batch (finish()); 0 = off. `recipe` records the reference
  # values once scaled (config.json keeps both).
  c.scaling = ml_collections.ConfigDict(dict(
      reference_batch=0, lr="sqrt", ema=True, lengths=True, apply=False,
      recipe=ml_collections.ConfigDict(dict(lr=None, tau_start=None, tau_end=None,
                                            anneal_steps=None, warmup_steps=None,
                                            total_steps=None, checkpoint_every=None))))

  c.init = ml_collections.ConfigDict()
  c.init.hf = ""                     # HF directory a NEW run starts from (d2v_jax/init.py)
  c.init.checkpoint = ""             # run directory whose latest student params start a NEW run
  c.init.fairseq = ""                # fairseq data2vec checkpoint (.pt) a NEW run starts from
                                     # (student, EMA teacher, decoder / head; docs/fairseq.md)

  c.data = ml_collections.ConfigDict()
  return c


def tau_schedule(c: ml_collections.ConfigDict, start: float, end: float, steps: int) -> None:
  c.teacher.tau_start, c.teacher.tau_end, c.teacher.anneal_steps = start, end, steps


def targets_and_loss(c: ml_collections.ConfigDict, *, top_k: int, layer_output: str,
                     layer_norm: str, final_norm: str, beta: float, scale, reduce_dims: str) -> None:
  """The target recipe (d2v_jax/targets.py) and the regression loss in one call."""
  c.target.update(dict(top_k=top_k, layer_output=layer_output, layer_norm=layer_norm,
                       final_norm=final_norm))
  c.loss.beta, c.loss.scale, c.loss.reduce_dims = beta, scale, reduce_dims


def v2_recipe(c: ml_collections.ConfigDict, *, clones: int, mask_prob: float, mask_adjust: float,
              mask_length: int, decoder: dict, cls_loss: float = 0.0) -> None:
  """Switches a config to the data2vec 2.0 objective with these masks and decoder."""
  c.objective = "v2"
  c.v2.clone_batch = clones
  c.v2.mask_prob, c.v2.mask_adjust, c.v2.mask_length = mask_prob, mask_adjust, mask_length
  c.v2.cls_loss = cls_loss
  c.v2.decoder.update(decoder)


def finish(c: ml_collections.ConfigDict, args: dict) -> ml_collections.ConfigDict:
  """Last line of every get_config: the production variants (base, large) compute in
  bfloat16 (params, teacher and optimizer state stay float32; docs/recipes.md), the small
  ones and runlocal in float32 (CPU tests compare numbers exactly); the recipe's global
  batch is the scaling reference; `fit=<topology>` then sets mesh, remat and batch for that
  slice (d2v_jax/fits.py)."""
  from d2v_jax import fits   # here: only a config that names a slice needs the topologies

  if args["variant"] in ("base", "large") and not args["runlocal"]:
    c.dtype = "bfloat16"
  c.scaling.reference_batch = c.batch_size
  fits.apply(c, args)
  return c


def runlocal(c: ml_collections.ConfigDict, steps: int = 300, batch: int = 8) -> None:
  """Shrink the schedule for a laptop / CI run."""
  c.total_steps = steps
  c.checkpoint_every = max(steps // 3, 1)
  c.batch_size = batch
  c.log_every = 10
  c.optim.warmup_steps = max(steps // 10, 1)
