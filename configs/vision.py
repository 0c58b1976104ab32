"""data2vec-vision on a BEiT encoder (docs/algorithm.md §2.2).

  python -m d2v_jax.train --config configs/vision.py:variant=base --workdir runs/vision_base \
      --config.data.tfds_data_dir=gs://bucket/tensorflow_datasets
  python -m d2v_jax.train --config configs/vision.py:variant=tiny,runlocal --workdir runs/vision_local

  python -m d2v_jax.train --config configs/vision.py:variant=base,v2 --workdir runs/vision_base_v2
  python -m d2v_jax.train --config configs/vision.py:runlocal,v2 --workdir runs/vision_local_v2

Arguments after the colon: variant=tiny|small|base|large, runlocal, v2. `runlocal` alone
trains the tiny variant.
`base` follows the released ViT-B/16 command of facebookresearch/data2vec_vision
(beit/README.md, run_cyclical.py), which is what produced the paper's numbers: BEiT ViT-B/16
at 224 px (pre-LN, LayerNorm eps 1e-6, q/v biases but no k bias, one shared relative
position bias table, no absolute positions, layer scale 1e-4), block masking of 120 of 196
patches (blocks >= 16 patches, aspect in [0.3, 1/0.3]), targets = mean of the
parameter-free-LayerNormed end-of-block outputs of the top 6 blocks, LayerNormed again,
smooth-L1 beta 2 averaged over masked patches and dims, linear regression head, EMA teacher
of the whole model at constant tau 0.9998, AdamW(0.9, 0.999, eps 1e-8) lr 2e-3 (warmup
from 1e-6, cosine to 1e-5), wd 0.05 except biases / norms / layer scales / tokens / the
relative position table, clip 3, batch 2048, 800 ImageNet epochs.

Paper vs released command (both real, docs/algorithm.md §2.2): the paper says warm-up 40 epochs
and stochastic depth 0.2; the README command uses `--warmup_epochs 10 --drop_path 0.25`.
We follow the command (10 epochs, 0.25) because it is the recipe that was run; override
with --config.optim.warmup_steps=25_000 --config.model.encoder.drop_path=0.2 for the paper.
`large` is the first 800-epoch stage of the README ViT-L recipe (layer scale 1e-5, drop path
0.2, attention dropout 0.15, lr 1e-3, 80 warm-up epochs, 64 GPUs x 64 = 4096 images); the
second stage (tau 0.9999, schedule reset, teacher <- student) is a new run started from it.

Data: ImageNet-1k from tfds (`imagenet2012`, prepared beforehand: it needs a manual download;
never downloaded here), or data.source="files" (a glob / directory of jpg/png) or
"tfrecord" (tf.train.Example with encoded image bytes under data.image_key).
`runlocal` trains for a few hundred steps on real photos written by `.ci/setup`
(scikit-image sample photos, .ci/data/vision.sh) to data/vision/photos, at 64 px with
8 px patches.

Initialisation as data2vec_vision (model.init = "beit"): trunc_normal_(std 0.02) truncated
at +-1 std for every Linear, the patch conv and the CLS / mask tokens, and each block's
attention output and fc2 weights divided by sqrt(2 * layer); "bert" keeps N(0, 0.02).

`v2` is data2vec 2.0 (fairseq examples/data2vec/config/v2/base_images_only_task.yaml,
docs/algorithm.md §3.7) run on the same BEiT encoder (so the export still loads in
Data2VecVisionModel; the released v2 ViT is post-LN with fixed sin-cos positions, which no HF
Data2Vec class holds): M = 16 clones per image, inverse block masking (R 0.8, A 0.07, B 3:
39 of 196 patches visible), the student encodes only the visible patches (+ CLS, the
relative position bias gathered on both axes), a 6-layer 2-D conv decoder (768 ch, kernel 3,
16 groups, residual) predicts all patches; targets = mean of the instance-normalised FFN
outputs of the top 10 blocks, LayerNormed; L2 x 1/sqrt(D) over masked patches; CLS loss on
the mean target; EMA of the whole encoder incl. patch embedding 0.9998 -> 0.99999 over 100k;
Adam(0.9, 0.95) wd 0.05 lr 1e-3, 50,040 warm-up + cosine, clip 4, 375,300 updates of 256
images; RandomResizedCrop scale (0.2, 1) + flip, no colour jitter; no dropout / drop path.
cls_loss: fairseq adds 0.01 x sample_size x (sum over its rows of the CLS loss) and divides
by sample_size, i.e. 0.01 x (rows per GPU = 16 images x 16 clones) x the mean row loss; our
cls_loss multiplies the mean row loss, hence fairseq's weight is 0.01 x 256 = 2.56.
Deliberate deviation: the default is cls_loss = 0 (off). fairseq's post-LN ViT regresses a
raw CLS output; on our pre-LN BEiT the CLS output passes through the final LayerNorm that
every patch output shares, so pulling the CLS toward the small mean target shrinks the
decoder's input too. Measured (runlocal, 100 steps, docs/v2.md): with 2.56 the
prediction/target cosine falls to 0.05 and the digits probe is 0.298 (random init 0.305);
with 0 the cosine rises to 0.16 and the probe is 0.415. --config.v2.cls_loss=2.56 restores
fairseq's weighting.
"""

from __future__ import annotations

from ml_collections import config_dict

from d2v_jax import recipe

SIZES = {
    # layers, hidden, heads, mlp
    "tiny": (4, 64, 2, 256),
    "small": (6, 256, 4, 1024),
    "base": (12, 768, 12, 3072),
    "large": (24, 1024, 16, 4096),
}

IMAGENET_TRAIN = 1_281_167            # imagenet2012 train split
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # --imagenet_default_mean_and_std
IMAGENET_STD = (0.229, 0.224, 0.225)
LOCAL_PHOTOS = "data/vision/photos"    # relative to the repo root; written by .ci/setup

# data2vec_vision / BEiT optim_factory: no weight decay on 1-D parameters (biases, norms,
# layer scales), names ending in .bias and the model's skip list {pos_embed, cls_token}; the
# mask token ([1, 1, D] there) and the 2-D relative position table ARE decayed. Substrings of
# parameter paths (d2v_jax/optim.py); by name because scanned layers stack 1-D parameters
# into 2-D arrays, and our mask token is 1-D and the table is named rel_pos_bias.
NO_DECAY = ("bias", "norm", "lambda_", "cls_token")
DECAY = ("mask_token", "rel_pos_bias")


def epochs_to_steps(epochs: float, batch: int, examples: int = IMAGENET_TRAIN) -> int:
  """Steps of `epochs` passes (data2vec_vision drops the last partial batch of an epoch)."""
  return int(round(epochs * (examples // batch)))


def get_config(arg: str | None = None):
  args = recipe.parse_arg(arg, variant="base")
  if args["variant"] not in SIZES:
    raise ValueError(f"variant={args['variant']!r}: use one of {sorted(SIZES)}")
  c = recipe.base_config("vision")
  layers, hidden, heads, mlp = SIZES[args["variant"]]
  large = args["variant"] == "large"

  c.model = config_dict.ConfigDict()
  c.model.image_size = 224
  c.model.patch_size = 16
  c.model.channels = 3
  c.model.init = "beit"                # beit: data2vec_vision's init (see above) | bert
  c.model.embed_dropout = 0.0          # BEiT pos_drop (drop_rate 0)
  # Position information: BEiT's shared relative position bias (rel_pos_bias) and/or fixed
  # 2-D sin-cos embeddings added to the patches (pos_embed="sincos": fairseq data2vec 2.0's
  # ViT, with model.encoder pre_ln=False, input_norm=True, layer_scale=0, key_bias=True,
  # final_norm=False). Only the BEiT form exports to Data2VecVisionModel.
  c.model.rel_pos_bias = True
  c.model.pos_embed = "none"           # none | sincos
  c.model.encoder = recipe.encoder(
      layers, hidden, heads, mlp, pre_ln=True, layer_norm_eps=1e-6, dropout=0.0,
      attention_dropout=0.15 if large else 0.05, activation_dropout=0.0,
      drop_path=0.2 if large else 0.25, layer_scale=1e-5 if large else 1e-4, key_bias=False,
      final_norm=True)

  c.teacher.ema_subtrees = ("embed", "encoder")   # everything but the head; nothing shared
  recipe.tau_schedule(c, 0.9998, 0.9998, 0)       # constant (DV --ema_start_at 0)

  c.target.top_k = min(6, layers) if layers >= 12 else max(1, layers // 2)
  c.target.layer_output = "end"
  c.target.layer_norm = "layer"
  c.target.final_norm = "layer"
  c.loss.beta = 2.0
  c.loss.scale = 1.0
  c.loss.reduce_dims = "mean"
  c.head.layers = 1                    # lm_head = Linear(D, D) after the final norm

  c.batch_size = 4096 if large else 2048
  epochs, warmup = 800, (80 if large else 10)
  c.total_steps = epochs_to_steps(epochs, c.batch_size)
  c.checkpoint_every = 5_000
  c.log_every = 50
  lr = 1e-3 if large else 2e-3
  c.optim.update(dict(lr=lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, decay_1d=False,
                      no_decay=NO_DECAY, decay=DECAY, clip=3.0, schedule="cosine",
                      warmup_steps=epochs_to_steps(warmup, c.batch_size),
                      init_lr_scale=1e-6 / lr, final_lr_scale=1e-5 / lr))

  c.data.source = "tfds"               # files | tfrecord | tfds
  c.data.path = "imagenet2012"         # glob / directory of images, TFRecord glob, or tfds name/dir
  c.data.split = "train"
  c.data.tfds_data_dir = ""            # tfds data_dir; empty: tfds default (~/tensorflow_datasets)
  c.data.image_key = "image"           # tfds feature / tf.train.Example key of the encoded image
  c.data.extensions = ()               # () = every format of data/vision.EXTENSIONS (any case)
  c.data.background = (255, 255, 255)  # RGB that transparent pixels are composited onto
  c.data.on_bad_image = "skip"         # skip (count, warn, use another image) | stop
  c.data.crop_scale = (0.08, 1.0)      # RandomResizedCrop area range (BEiT)
  c.data.crop_ratio = (3 / 4, 4 / 3)
  c.data.flip = True
  c.data.color_jitter = (0.4, 0.4, 0.4)  # brightness, contrast, saturation (0 = off)
  c.data.mean = IMAGENET_MEAN
  c.data.std = IMAGENET_STD
  c.data.num_mask_patches = config_dict.placeholder(int)  # None: round(120/196 * patches)
  c.data.min_mask_block = 16
  c.data.max_mask_block = config_dict.placeholder(int)    # None: all patches (BEiT 196)
  c.data.mask_min_aspect = 0.3
  c.data.mask_max_aspect = config_dict.placeholder(float)  # None: 1 / mask_min_aspect
  c.data.mask_attempts = 0             # block draws per image; 0: 4 * ceil(mask / min_block)
  c.data.shuffle_buffer = 10_000       # tfrecord / tfds (sequential sources) only
  c.data.threads = 0                   # tf.data private thread pool; 0: tf.data default

  if args["runlocal"]:
    recipe.runlocal(c, steps=300, batch=16)
    c.model.image_size = 64
    c.model.patch_size = 8             # 8 x 8 = 64 patches, 39 masked
    c.model.encoder.drop_path = 0.1
    c.model.encoder.attention_dropout = 0.0
    c.data.source = "files"
    c.data.path = LOCAL_PHOTOS
    c.data.shuffle_buffer = 256
    c.optim.lr = 1e-3
    c.optim.init_lr_scale, c.optim.final_lr_scale = 0.0, 0.01
    recipe.tau_schedule(c, 0.99, 0.999, 300)
  if args["v2"]:
    v2(c, layers, runlocal=args["runlocal"])
  return recipe.finish(c, args)

def v2(c, layers: int, runlocal: bool) -> None:
  hidden = c.model.encoder.hidden
  recipe.v2_recipe(c, clones=16, mask_prob=0.8, mask_adjust=0.07, mask_length=3,
                   decoder=dict(kind="2d", dim=hidden, kernel=3, groups=16, layers=6,
                                residual=True, proj_layers=1, input_dropout=0.0),
                   cls_loss=0.0)   # fairseq: 0.01 x 256; off here, see the docstring
  c.model.encoder.update(dict(dropout=0.0, attention_dropout=0.0, drop_path=0.0))
  recipe.targets_and_loss(c, top_k=min(10, layers) if layers >= 12 else max(1, layers - 1),
                          layer_output="ffn", layer_norm="instance", final_norm="layer",
                          beta=0.0, scale=None, reduce_dims="sum")   # L2 x 1 / sqrt(D)
  c.data.crop_scale = (0.2, 1.0)
  c.data.color_jitter = (0.0, 0.0, 0.0)
  if runlocal:
    c.v2.clone_batch = 4
    c.v2.decoder.layers = 3
    c.batch_size = 8                     # x 4 clones; 64 patches, 12 visible
    c.optim.update(dict(b2=0.95, clip=4.0))
    return
  recipe.tau_schedule(c, 0.9998, 0.99999, 100_000)
  c.batch_size = 256
  c.total_steps = 375_300
  c.optim.update(dict(lr=1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05, clip=4.0,
                      schedule="cosine", warmup_steps=50_040, init_lr_scale=0.0,
                      final_lr_scale=0.0))
