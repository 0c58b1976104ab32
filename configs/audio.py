"""data2vec-audio on a wav2vec 2.0 encoder (docs/algorithm.md §2.3).

  python -m d2v_jax.train --config configs/audio.py:variant=base --workdir runs/audio_base \
      --config.data.path=librispeech --config.data.split=train_clean100+train_clean360+train_other500
  python -m d2v_jax.train --config configs/audio.py:variant=base --workdir runs/audio_base \
      --config.data.source=files --config.data.path='/data/LibriSpeech/train-*/**/*.flac'
  python -m d2v_jax.train --config configs/audio.py:variant=tiny,runlocal --workdir runs/audio_local

  python -m d2v_jax.train --config configs/audio.py:variant=base,v2 --workdir runs/audio_base_v2
  python -m d2v_jax.train --config configs/audio.py:runlocal,v2 --workdir runs/audio_local_v2

Arguments after the colon: variant=tiny|base|large, runlocal, v2 (`runlocal` alone: tiny). `large` only scales the
encoder (24 x 1024, 16 heads) with the base recipe; its released hyper-parameters were not
checked (docs/algorithm.md covers base only).

`base` is the released fairseq recipe (examples/data2vec/config/audio/pretraining/
base_librispeech.yaml): 7-layer conv feature extractor (512 ch, kernels (10,3,3,3,3,2,2),
strides (5,2,2,2,2,2,2), no bias, LayerNorm + GELU in every layer), 5-layer grouped
positional conv (kernel 19 = conv_pos 95 // 5, 16 groups), post-LN 12 x 768 encoder with
layerdrop 0.05; targets = mean of the top 8 FFN outputs, each instance-normalised over time
(padded frames left out), L2 loss summed over dims x 1/sqrt(768), linear head; EMA
0.999 -> 0.9999 over 30k updates (only the Transformer + its input LayerNorm; the conv front
end and positional conv are shared); Adam(0.9, 0.98, eps 1e-6), wd 0.01, lr 5e-4, tri-stage
3 % / 90 % / 7 % (init and final lr scale 0.01, fairseq's defaults), 400k updates; span masks
p=0.65, length 10, min 1 span, with an exact count per row (the expected fairseq count
at the row's length, spread uniformly over the row: d2v_jax/data/masking_audio.py).

Batch size. fairseq packs max_tokens=3.8M samples per GPU x 16 GPUs = 60.8M samples (63.3 min)
per update and crops every utterance of a batch to the shortest one (no padding; utterances of
2 s to 20 s). We bucket instead (data.buckets, d2v_jax/data/audio.py): every batch comes from
one of 10 crop lengths (2, 4, ..., 20 s), each clip cropped to the largest bucket it fills, so
no frame is padding (36 % of the frames were padding with one padded 20 s shape) and there
are 10 compiled step shapes. The global batch of a bucket is batch_size x 20 s / its length
(rounded down to a multiple of the device count), so every batch holds about batch_size x
20 s of audio: batch_size = 192 gives 64 min, ~ the fairseq 63.3 min. data.min_samples =
32,000 (fairseq min_sample_size, 2 s) drops short files. data.buckets = () restores the single
right-padded shape of data.max_samples.

`runlocal` trains the tiny model for a few hundred CPU steps on real speech: the Asterisk
English prompts (Debian asterisk-core-sounds-en-g722, 16 kHz) that `.ci/data/audio.sh`
decodes to data/audio/prompts/*.wav; 2 s crops, clips under 1 s left out.
"""

from __future__ import annotations

import ml_collections

from d2v_jax import recipe

SIZES = {
    # layers, hidden, heads, mlp, conv channels, pos-conv groups
    "tiny": (2, 64, 2, 256, 64, 16),
    "base": (12, 768, 12, 3072, 512, 16),
    "large": (24, 1024, 16, 4096, 512, 16),
}

LOCAL_AUDIO = "data/audio/prompts/*.wav"  # relative to the repo root; written by .ci/data/audio.sh


def get_config(arg: str | None = None):
  args = recipe.parse_arg(arg, variant="base")
  if args["variant"] not in SIZES:
    raise ValueError(f"unknown variant {args['variant']!r}; valid: {sorted(SIZES)}")
  c = recipe.base_config("audio")
  layers, hidden, heads, mlp, conv, groups = SIZES[args["variant"]]

  c.model = ml_collections.ConfigDict()
  c.model.conv_dims = (conv,) * 7
  c.model.conv_kernels = (10, 3, 3, 3, 3, 2, 2)
  c.model.conv_strides = (5, 2, 2, 2, 2, 2, 2)   # 320x: 50 frames/s at 16 kHz
  c.model.conv_bias = False
  c.model.conv_norm = "layer"        # layer: every conv layer (data2vec) | group: wav2vec2 base | none
  c.model.feature_dropout = 0.0      # fairseq dropout_input
  # Gradient into the conv feature encoder x this (fairseq feature_grad_mult): 1.0 = data2vec
  # (docs/algorithm.md); wav2vec 2.0 base used 0.1. Under Adam a constant factor on parameters
  # with no other gradient cancels up to eps (0.1 trains like 1.0, docs/evaluation.md); only 0,
  # a frozen conv stack, differs.
  c.model.feature_grad_mult = 1.0
  c.model.pos_conv = "data2vec"      # data2vec: depth x (conv, LN, GELU) | wav2vec2: weight-normed k=128
  c.model.pos_conv_depth = 5
  c.model.pos_conv_kernel = 19       # fairseq conv_pos 95 // pos_conv_depth 5; wav2vec2: 128
  c.model.pos_conv_groups = groups
  # ALiBi attention bias with a learned per-head scale (fairseq data2vec 2.0 audio's
  # use_alibi_encoder): off by default so the export is an ordinary Data2VecAudioModel; on,
  # released v2 audio checkpoints import exactly and export with remote code (docs/fairseq.md).
  c.model.alibi = False
  c.model.encoder = recipe.encoder(layers, hidden, heads, mlp, pre_ln=False, input_norm=True,
                                   layer_norm_eps=1e-5, dropout=0.1, attention_dropout=0.1,
                                   activation_dropout=0.0, layerdrop=0.05)

  c.teacher.ema_subtrees = ("encoder",)   # conv front end + positional conv are shared
  c.teacher.share_local = True            # the teacher reads the student's conv features
  recipe.tau_schedule(c, 0.999, 0.9999, 30_000)

  c.target.top_k = min(8, layers)
  c.target.layer_output = "ffn"
  c.target.layer_norm = "instance"
  c.target.final_norm = "none"
  c.loss.beta = 0.0
  c.loss.scale = None                # 1 / sqrt(hidden)
  c.loss.reduce_dims = "sum"
  c.head.layers = 1

  c.total_steps = 400_000
  c.checkpoint_every = 10_000
  c.batch_size = 192                 # x 20 s per batch (all buckets): 64 min of audio
  c.optim.update(dict(lr=5e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01, decay_1d=True,
                      clip=0.0, schedule="tri_stage", stage_ratios=(0.03, 0.9, 0.07),
                      init_lr_scale=0.01, final_lr_scale=0.01))
  c.guards.min_target_var = 0.1      # fairseq: stop when targets / predictions collapse
  c.guards.min_pred_var = 0.01
  c.guards.collapse_after = 5000

  c.data.source = "tfds"             # files | tfrecord | tfds
  c.data.path = "librispeech"        # tfds name / directory, or a glob of audio files / TFRecords
  c.data.split = "train_clean100+train_clean360+train_other500"
  c.data.tfds_data_dir = ""          # tfds data_dir; empty: the tfds default
  c.data.audio_key = "speech"        # tfds LibriSpeech; "audio" is usual in TFRecords
  c.data.rate_key = "sample_rate"    # optional int64 feature of TFRecords
  c.data.sample_rate = 16_000
  c.data.on_bad_rate = "error"       # error | resample
  c.data.normalize = True            # per-utterance zero mean / unit variance (fairseq normalize)
  c.data.max_samples = 320_000       # largest crop (20 s); unbucketed: shorter utterances are padded
  c.data.min_samples = 32_000        # shorter files are left out (source=files)
  # Length buckets (samples; d2v_jax/data/audio.py): every batch is cut from one bucket, each
  # clip cropped to the largest bucket <= its length: no padding, one jit shape per bucket.
  # () = one padded shape of max_samples.
  c.data.buckets = tuple(s * 16_000 for s in range(2, 21, 2))   # 2, 4, ..., 20 s
  c.data.batch_multiple = 0          # bucket batches are multiples of this; 0 = jax.device_count()
  c.data.mask_prob = 0.65
  c.data.span = 10
  c.data.min_spans = 1
  c.data.same_count = True           # exact masked count per row from its valid length (equal lengths: equal counts)
  c.data.on_bad_file = "error"       # error | skip: unreadable files left out of the index (first one named)
  c.data.threads = 0                 # tf.data private threadpool size; 0 = TF default

  if args["runlocal"]:
    recipe.runlocal(c, steps=300, batch=8)
    c.data.source = "files"
    c.data.path = LOCAL_AUDIO
    c.data.audio_key = "audio"
    c.data.max_samples = 32_000      # 2 s crops: 99 frames
    c.data.min_samples = 16_000
    c.data.buckets = (16_000, 24_000, 32_000)  # 1, 1.5, 2 s: keeps every clip of >= 1 s
    c.optim.lr = 1e-3
    c.model.encoder.layerdrop = 0.0
    c.checkpoint_every = 100
    recipe.tau_schedule(c, 0.99, 0.999, 300)
    # The teacher keeps its own EMA of the positional conv (as data2vec 2.0 audio does) instead
    # of reading the student's live one. With the pos conv shared, the tiny student shrinks the
    # time-varying part of its local features 5-12x, the encoder input (student's and teacher's)
    # becomes the shared pos conv's output (its rank 63 -> ~20) and rank_target falls 47 -> 5;
    # held-out language ID at step 300 over seeds 0-3: 0.39 / 0.58 / 0.60 / 0.49 shared, 0.61 /
    # 0.61 / 0.68 / 0.67 with this line (random init 0.47 / 0.37 / 0.47 / 0.50). The conv front
    # end stays shared (share_local).
    c.teacher.ema_subtrees = ("encoder", "embed/pos_conv_*")
    c.guards.min_target_var = 0.0
    c.guards.min_pred_var = 0.0
  if args["v2"]:
    v2(c, layers, hidden, runlocal=args["runlocal"])
  return recipe.finish(c, args)

def v2(c, layers: int, hidden: int, runlocal: bool) -> None:
  """data2vec 2.0 (fairseq config/v2/base_audio_only_task.yaml, docs/algorithm.md §3.7, §3.9) on
  the same data2vec-audio encoder (ALiBi is not used: the export must load in
  Data2VecAudioModel). M = 8 clones, 1-D block masks (R 0.5, A 0.05, B 5, exact count per
  row, computed after the bucketed crop), masked frames zeroed before the positional conv,
  only visible frames encoded; 4-layer conv decoder (384 ch, kernel 7, 16 groups, residual
  from block 2, input dropout 0.1); targets = mean of the instance-normalised FFN outputs of
  the top 8 blocks; L2 x 1/sqrt(D); the teacher reads the student's conv features and EMAs
  the positional conv and the blocks; EMA 0.999 -> 0.99999 over 75k; Adam(0.9, 0.98, eps
  1e-6) wd 0.01 lr 7.5e-4, 8k warm-up + cosine, no clipping, 400k updates."""
  recipe.v2_recipe(c, clones=8, mask_prob=0.5, mask_adjust=0.05, mask_length=5,
                   decoder=dict(kind="1d", dim=hidden // 2, kernel=7, groups=16, layers=4,
                                residual=True, proj_layers=1, input_dropout=0.1))
  c.teacher.ema_subtrees = ("encoder", "embed/pos_conv_*")
  c.teacher.share_local = True
  recipe.targets_and_loss(c, top_k=min(8, layers), layer_output="ffn", layer_norm="instance",
                          final_norm="none", beta=0.0, scale=None, reduce_dims="sum")
  if runlocal:
    c.v2.clone_batch = 4
    c.v2.decoder.layers = 3
    return
  recipe.tau_schedule(c, 0.999, 0.99999, 75_000)
  c.optim.update(dict(lr=7.5e-4, schedule="cosine", warmup_steps=8_000, clip=0.0,
                      init_lr_scale=0.0, final_lr_scale=0.0))
