"""Linear and k-NN probes on frozen data2vec features.

  python -m d2v_jax.probe --workdir RUN_DIR --data PATH [--weights student|teacher]
      [--layer N] [--random-init | --baseline] [--step S] [--seed 0] [--repeats 1] [--k 20]
      [--out JSON]

Features: the end-of-block output of block N (1-based; negative counts from the end; default
the last block), mean-pooled over the valid, non-extra tokens (no CLS, no padding) of the
unmasked input; no final norm, no head. Data: a folder per class (images: the trainer's list,
d2v_jax.data.vision.EXTENSIONS or the run's data.extensions; audio: the trainer's
d2v_jax.data.audio.EXTENSIONS / list_files, e.g. .wav .flac .ogg .mp3) or, for text, a TSV
of `text<TAB>label` lines.
Preprocessing is the run's, without masking or augmentation: text is tokenized with the run's
tokenizer (data.tokenizer or WORKDIR/tokenizer) as <s> text </s> (its bos / eos, or [CLS] /
[SEP]), cut at data.block_size and padded with model.pad_id; images are decoded as in
training (alpha composited onto data.background), resized (shorter side) and
centre-cropped to model.image_size and normalised by data.mean /
data.std; audio is decoded at data.sample_rate, normalised per
utterance (data.normalize) and cut / zero-padded to data.max_samples from its start.
The same stratified, seeded splits (--test-frac held out; --repeats N splits with seeds
seed..seed+N-1, reported as mean +- std) serve every row, so pretrained and random init are
compared on the same examples. The probes: multinomial logistic regression on
standardised features, and k-NN (cosine) on the same standardised features.
`--random-init` probes a fresh init of the run's architecture (seed: the run's cfg.seed, i.e.
the run's own starting weights); `--baseline` prints both rows in one call.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

from d2v_jax import console  # noqa: F401,E402  (first: quiet console)

os.environ.setdefault("USE_TF", "0")  # transformers: tokenizer only, no TF model classes

import numpy as np  # noqa: E402

from d2v_jax.config import ConfigError  # noqa: E402


@dataclasses.dataclass
class LabelledSet:
  arrays: dict          # model inputs (numpy), leading dim N, as the modality's batches
  labels: np.ndarray    # int32 [N]
  classes: list         # class names, label i -> classes[i]
  names: list           # per example: file path or text (for reports)


@dataclasses.dataclass
class Features:
  pooled: np.ndarray    # [N, D] mean over valid, non-extra tokens
  gram: np.ndarray      # [D, D] float64: sum over those tokens of x x^T (effective rank)
  tokens: int           # number of tokens in `gram`


# ---------------------------------------------------------------------------- datasets


def _label_ids(names: list[str]) -> tuple[np.ndarray, list[str]]:
  classes = sorted(set(names))
  index = {c: i for i, c in enumerate(classes)}
  return np.asarray([index[n] for n in names], np.int32), classes


def read_tsv(path: str) -> tuple[list[str], list[str]]:
  """`text<TAB>label` lines (blank lines skipped) -> (texts, labels)."""
  if not os.path.isfile(path):
    raise ConfigError(f"probe data {path!r} is not a file; text probes read a text<TAB>label TSV")
  texts, labels = [], []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      line = line.rstrip("\n")
      if not line.strip():
        continue
      text, tab, label = line.rpartition("\t")
      if not tab or not text.strip() or not label.strip():
        raise ConfigError(f"{path}:{n}: expected `text<TAB>label`, got {line[:60]!r}")
      texts.append(text.strip())
      labels.append(label.strip())
  if not texts:
    raise ConfigError(f"{path} holds no `text<TAB>label` line")
  return texts, labels


def class_folders(path: str, extensions, lister=None) -> tuple[list[str], list[str]]:
  """A folder per class -> (files, class names); files sorted, classes = folder names.
  `lister(dir)` (the trainer's own file lister, e.g. audio.list_files) finds the files of a
  class folder; without it, the files below it whose extension is in `extensions`."""
  if not os.path.isdir(path):
    raise ConfigError(f"probe data {path!r} is not a directory; image / audio probes read a "
                      "folder per class (PATH/<class>/<files>)")
  exts = tuple(e.lower() for e in extensions)
  files, labels = [], []
  for cls in sorted(os.listdir(path)):
    d = os.path.join(path, cls)
    if not os.path.isdir(d):
      continue
    if lister is not None:
      try:
        found = sorted(lister(d))
      except ConfigError:
        found = []
    else:
      found = sorted(os.path.join(root, n) for root, _, names in os.walk(d, followlinks=True)
                     for n in names if n.lower().endswith(exts))
    if not found:
      raise ConfigError(f"class folder {d} holds no file with extension in {sorted(set(exts))}")
    files += found
    labels += [cls] * len(found)
  if len(set(labels)) < 2:
    raise ConfigError(f"{path} needs at least two class folders with files; found {sorted(set(labels))}")
  return files, labels


def text_tokenizer(cfg, workdir: str | None):
  """The run's tokenizer: data.tokenizer, else the one training wrote to WORKDIR/tokenizer."""
  from d2v_jax.data import text as text_data
  path = cfg.data.tokenizer or (os.path.join(text_data._local_dir(workdir), "tokenizer")
                                if workdir else "")
  if not path or not os.path.isdir(path):
    raise ConfigError(f"no tokenizer for the text probe: data.tokenizer is empty and {path!r} "
                      "does not exist; probe a run directory that trained (it writes "
                      "WORKDIR/tokenizer) or set data.tokenizer")
  return text_data.load_tokenizer(path)


def _text_set(cfg, workdir, path) -> LabelledSet:
  texts, names = read_tsv(path)
  from d2v_jax.data import text as text_data
  tok = text_tokenizer(cfg, workdir)
  block = int(cfg.data.block_size)
  # as training packs: the tokenizer's bos + tokens + eos (its own padding / truncation off)
  bos, eos = text_data.special_ids(tok)["bos"], text_data.special_ids(tok)["eos"]
  enc = text_data.corpus_encoder(tok).encode_batch(texts, add_special_tokens=False)
  ids = [[bos] + e.ids[: block - 2] + [eos] for e in enc]
  # one length for the whole set (one compile), as short as the longest example allows
  t = min(block, 8 * math.ceil(max(len(x) for x in ids) / 8))
  out = np.full((len(ids), t), cfg.model.pad_id, np.int32)
  for i, x in enumerate(ids):
    out[i, :len(x)] = x
  labels, classes = _label_ids(names)
  arrays = {"source": out, "student": out.copy(), "mask": np.zeros(out.shape, bool)}
  return LabelledSet(arrays, labels, classes, texts)


def load_image(path: str, cfg) -> np.ndarray:
  """Eval preprocessing: decoded as in training (vision.decode_rgb: alpha composited onto
  data.background), shorter side -> image_size (bicubic, antialiased), centre crop, [0, 1],
  normalised by data.mean / data.std. float32 [S, S, 3]."""
  import tensorflow as tf

  from d2v_jax.data import vision
  s = int(cfg.model.image_size)
  try:
    img = vision.decode_rgb(tf.io.read_file(path), vision.background(cfg))
  except tf.errors.OpError as e:
    raise ConfigError(f"image {path} cannot be decoded: {e.message.splitlines()[0]}") from None
  h, w = int(img.shape[0]), int(img.shape[1])
  scale = s / min(h, w)
  nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
  img = tf.image.resize(img, [nh, nw], method="bicubic", antialias=True)
  top, left = (nh - s) // 2, (nw - s) // 2
  img = tf.clip_by_value(img[top:top + s, left:left + s] / 255.0, 0.0, 1.0)
  img = (img - tf.constant(cfg.data.mean, tf.float32)) / tf.constant(cfg.data.std, tf.float32)
  return img.numpy().astype(np.float32)


def _image_set(cfg, workdir, path) -> LabelledSet:
  from d2v_jax.data import vision
  files, names = class_folders(path, vision.image_extensions(cfg))
  images = np.stack([load_image(f, cfg) for f in files])
  labels, classes = _label_ids(names)
  arrays = {"image": images, "mask": np.zeros((len(files), vision.num_patches(cfg)), bool)}
  return LabelledSet(arrays, labels, classes, files)


def load_clip(path: str, cfg) -> tuple[np.ndarray, int]:
  """Eval preprocessing: mono at data.sample_rate, per-utterance normalisation
  (data.normalize), the first data.max_samples samples, zero right-padding."""
  import tensorflow as tf

  from d2v_jax.data import audio
  rate = int(cfg.data.sample_rate)
  with open(path, "rb") as f:
    data = f.read()
  x = None
  if data[:4] == b"RIFF":
    try:
      wav, r = tf.audio.decode_wav(data)
      if int(r) == rate:
        x = tf.reduce_mean(wav, axis=1)
    except tf.errors.OpError:
      x = None  # not 16-bit PCM: ffmpeg below
  if x is None:
    try:
      x = tf.constant(audio._ffmpeg_decode(data, rate))
    except ValueError as e:
      raise ConfigError(f"audio {path}: {e}") from None
  if int(tf.size(x)) == 0:
    raise ConfigError(f"audio {path} has no samples")
  if cfg.data.normalize:
    x = audio.normalize(x)
  x = x.numpy()[: int(cfg.data.max_samples)].astype(np.float32)
  n = len(x)
  return np.pad(x, (0, int(cfg.data.max_samples) - n)), n


def _audio_set(cfg, workdir, path) -> LabelledSet:
  from d2v_jax.data import audio
  files, names = class_folders(path, audio.EXTENSIONS, lister=audio.list_files)
  clips = [load_clip(f, cfg) for f in files]
  labels, classes = _label_ids(names)
  frames = audio.frames(cfg, cfg.data.max_samples)
  arrays = {"audio": np.stack([c[0] for c in clips]),
            "audio_len": np.asarray([c[1] for c in clips], np.int32),
            "mask": np.zeros((len(files), frames), bool)}
  return LabelledSet(arrays, labels, classes, files)


LOADERS = {"text": _text_set, "vision": _image_set, "audio": _audio_set}


def load_labelled(cfg, workdir: str | None, path: str) -> LabelledSet:
  """The labelled set at `path`, preprocessed for the run's modality."""
  if cfg.modality not in LOADERS:
    raise ConfigError(f"no probe data loader for modality {cfg.modality!r}; known: {sorted(LOADERS)}")
  return LOADERS[cfg.modality](cfg, workdir, path)


# ---------------------------------------------------------------------------- features


def layer_index(layer: int, num_layers: int) -> int:
  """1-based block number (negative: from the end) -> 0-based index into the stack."""
  if 1 <= layer <= num_layers:
    return layer - 1
  if -num_layers <= layer <= -1:
    return num_layers + layer
  raise ConfigError(f"layer={layer}: use 1..{num_layers} (block number) or -1..-{num_layers} "
                    "(from the end)")


class FeatureEncoder:
  """Jitted forward on `built.mesh`: (params, arrays) -> Features of the chosen block.

  Runs in chunks of `chunk` examples (a multiple of the batch shards, so the model's batch
  sharding constraint holds); the last chunk is padded with rows that count nowhere.
  """

  def __init__(self, built, layer: int = -1, chunk: int = 64):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from d2v_jax import sharding

    self.mesh = built.mesh
    self.num_layers = int(built.cfg.model.encoder.num_layers)
    self.index = layer_index(int(layer), self.num_layers)
    shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    self.chunk = shards * max(1, math.ceil(chunk / shards))
    model = built.model.clone(collect="end")  # same params; per-block end-of-block outputs
    n_extra, idx = model.embed.num_extra_tokens, self.index

    def fn(params, batch, ok):
      with nn.logical_axis_rules(sharding.RULES):
        out = model.apply({"params": params}, batch, student=False, deterministic=True)
      h = out["layers"][idx][:, n_extra:].astype(jnp.float32)
      valid = out["valid"]
      w = jnp.ones(h.shape[:2], jnp.float32) if valid is None else valid[:, n_extra:].astype(jnp.float32)
      w = w * ok[:, None].astype(jnp.float32)
      pooled = (h * w[..., None]).sum(1) / jnp.maximum(w.sum(1, keepdims=True), 1.0)
      hw = h * w[..., None]
      return pooled, jnp.einsum("btd,bte->de", hw, hw), w.sum()

    self._rep = NamedSharding(self.mesh, P())
    self._fn = jax.jit(fn, out_shardings=(self._rep, self._rep, self._rep))

  def __call__(self, params, arrays: dict) -> Features:
    import jax
    n = len(next(iter(arrays.values())))
    pooled, gram, tokens = [], None, 0.0
    with jax.set_mesh(self.mesh):
      for start in range(0, n, self.chunk):
        stop = min(start + self.chunk, n)
        pad = self.chunk - (stop - start)
        rows = np.r_[np.arange(start, stop), np.full(pad, start, np.int64)]
        batch = {k: jax.device_put(np.asarray(v)[rows], self._rep) for k, v in arrays.items()
                 if np.asarray(v).dtype.kind in "biuf"}  # model inputs only (no file names)
        ok = jax.device_put(np.arange(self.chunk) < stop - start, self._rep)
        p, g, c = jax.device_get(self._fn(params, batch, ok))
        pooled.append(np.asarray(p)[: stop - start])
        g = np.asarray(g, np.float64)
        gram = g if gram is None else gram + g
        tokens += float(c)
    return Features(np.concatenate(pooled), gram, int(tokens))


# ---------------------------------------------------------------------------- probes


def split(labels: np.ndarray, test_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Stratified, seeded train / test indices."""
  from sklearn.model_selection import train_test_split
  counts = np.bincount(labels)
  if (counts[counts > 0] < 2).any():
    raise ConfigError("every class needs at least 2 examples for a stratified split; "
                      f"class sizes: {counts.tolist()}")
  if not 0.0 < test_frac < 1.0:
    raise ConfigError(f"test fraction {test_frac} must be in (0, 1)")
  idx = np.arange(len(labels))
  train, test = train_test_split(idx, test_size=test_frac, stratify=labels, random_state=seed)
  return np.sort(train), np.sort(test)


def fit_probes(x: np.ndarray, labels: np.ndarray, *, seed: int = 0, test_frac: float = 0.3,
               k: int = 20, c: float = 1.0, indices=None) -> dict:
  """Linear (logistic regression) and k-NN (cosine) test accuracy on standardised features.

  `chance` is the majority-class fraction of the test split (what a constant guess scores).
  """
  from sklearn.linear_model import LogisticRegression
  from sklearn.neighbors import KNeighborsClassifier
  from sklearn.preprocessing import StandardScaler

  x = np.asarray(x, np.float64)
  if not np.isfinite(x).all():
    raise ValueError("features hold NaN / inf: the checkpoint is broken (non-finite weights)")
  train, test = indices if indices is not None else split(labels, test_frac, seed)
  scaler = StandardScaler().fit(x[train])
  xtr, xte = scaler.transform(x[train]), scaler.transform(x[test])
  ytr, yte = labels[train], labels[test]
  lin = LogisticRegression(C=c, max_iter=3000).fit(xtr, ytr)
  kk = min(k, len(train))
  knn = KNeighborsClassifier(n_neighbors=kk, metric="cosine", algorithm="brute").fit(xtr, ytr)
  return {"linear_acc": float((lin.predict(xte) == yte).mean()),
          "knn_acc": float((knn.predict(xte) == yte).mean()),
          "chance": float(np.bincount(yte).max() / len(yte)),
          "n_train": int(len(train)), "n_test": int(len(test)), "k": int(kk)}


def fit_probes_repeated(x: np.ndarray, labels: np.ndarray, splits: list, **kw) -> dict:
  """fit_probes over several (train, test) splits: means, standard deviations, and each split."""
  runs = [fit_probes(x, labels, indices=ix, **kw) for ix in splits]
  out = dict(runs[0])
  for key in ("linear_acc", "knn_acc", "chance"):
    vals = np.array([r[key] for r in runs])
    out[key], out[key + "_std"] = float(vals.mean()), float(vals.std())
  out["splits"] = [{k: r[k] for k in ("linear_acc", "knn_acc", "chance")} for r in runs]
  return out


# ---------------------------------------------------------------------------- CLI


def _run_config(workdir: str):
  """The run's resolved config: WORKDIR/config.json (written at start-up), else checkpoint meta."""
  from d2v_jax import checkpoint, config as config_lib
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      return config_lib.from_dict(json.load(f))
  _, meta = checkpoint.read_meta(workdir)
  return config_lib.from_dict(meta["config"])


def probe(workdir: str, data: str, *, weights: str = "student", layer: int = -1,
          random_init: bool = False, baseline: bool = False, step: int | None = None,
          seed: int = 0, test_frac: float = 0.3, k: int = 20, c: float = 1.0,
          init_seed: int | None = None, repeats: int = 1) -> dict | None:
  """Probe rows for the run (and / or a random init of its architecture); see module doc.
  With several processes only process 0 probes; the others join the checkpoint restore
  (orbax needs every process) and return None."""
  import jax

  from d2v_jax import build as build_lib, distributed, export
  from d2v_jax.health import effective_rank_from_gram

  rows_to_do = ([] if random_init else [weights]) + (["random-init"] if random_init or baseline else [])
  params_of, ckpt_step = {}, None
  if not random_init:
    params, cfg, ckpt_step, built = export.restore_params(workdir, weights, step)
    params_of[weights] = params
  if not distributed.is_writer():
    return None
  if random_init:
    cfg = _run_config(workdir)
    cfg.mesh.update(dict(data=-1, fsdp=1, tensor=1))
    built = build_lib.build(cfg, devices=jax.local_devices()[:1])
  if "random-init" in rows_to_do:
    s = int(cfg.seed if init_seed is None else init_seed)
    params_of["random-init"] = jax.device_get(built.init(s).params)
  enc = FeatureEncoder(built, layer)  # a bad --layer fails before the data is read
  t0 = time.time()
  ds = load_labelled(cfg, workdir, data)
  t_load = time.time() - t0
  splits = [split(ds.labels, test_frac, seed + i) for i in range(max(1, repeats))]
  rows = []
  for name in rows_to_do:
    t0 = time.time()
    feats = enc(jax.device_put(params_of[name], enc._rep), ds.arrays)
    res = fit_probes_repeated(feats.pooled, ds.labels, splits, k=k, c=c)
    res.update(weights=name, effective_rank=effective_rank_from_gram(feats.gram),
               seconds=round(time.time() - t0, 1))
    rows.append(res)
  return {"workdir": os.path.abspath(workdir), "data": os.path.abspath(data),
          "modality": cfg.modality, "step": ckpt_step, "layer": enc.index + 1,
          "num_layers": enc.num_layers, "hidden": int(cfg.model.encoder.hidden),
          "classes": ds.classes, "class_sizes": np.bincount(ds.labels).tolist(),
          "split_seeds": list(range(seed, seed + max(1, repeats))), "test_frac": test_frac,
          "load_seconds": round(t_load, 1), "rows": rows}


def format_table(result: dict) -> str:
  r0 = result["rows"][0]
  n = len(result["split_seeds"])
  head = (f"probe {result['data']} | {result['modality']} run {result['workdir']} "
          f"step {result['step']} | layer {result['layer']}/{result['num_layers']} | "
          f"{len(result['classes'])} classes, train {r0['n_train']} / test {r0['n_test']}"
          + (f" | mean +- std over {n} splits" if n > 1 else ""))
  acc = lambda r, key: (f"{r[key]:.4f}" + (f" +- {r[key + '_std']:.4f}" if n > 1 else ""))
  w = 17 if n > 1 else 8
  knn = f"k-NN(k={r0['k']})"
  lines = [head, f"{'weights':<13} {'linear':>{w}} {knn:>{w}} {'chance':>8} {'eff.rank':>9}"]
  for r in result["rows"]:
    lines.append(f"{r['weights']:<13} {acc(r, 'linear_acc'):>{w}} {acc(r, 'knn_acc'):>{w}} "
                 f"{r['chance']:>8.4f} {r['effective_rank']:>9.2f}")
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m d2v_jax.probe", description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="run directory written by d2v_jax.train")
  p.add_argument("--data", required=True,
                 help="labelled set: folder per class (images, audio) or text<TAB>label TSV (text)")
  p.add_argument("--weights", default="student", choices=("student", "teacher"))
  p.add_argument("--layer", type=int, default=-1, help="block number 1..L, or -1 (last) .. -L")
  g = p.add_mutually_exclusive_group()
  g.add_argument("--random-init", action="store_true",
                 help="probe a fresh init of the run's architecture instead of its checkpoint")
  g.add_argument("--baseline", action="store_true", help="probe the checkpoint and a random init")
  p.add_argument("--init-seed", type=int, default=None, help="random-init seed (default: the run's)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--seed", type=int, default=0, help="seed of the stratified train/test split")
  p.add_argument("--test-frac", type=float, default=0.3)
  p.add_argument("--repeats", type=int, default=1,
                 help="stratified splits with seeds seed..seed+N-1; reports mean +- std")
  p.add_argument("--k", type=int, default=20, help="neighbours of the k-NN probe")
  p.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the linear probe")
  p.add_argument("--out", default=None, help="JSON file (default WORKDIR/probe/<tag>.json)")
  from d2v_jax import distributed
  distributed.add_args(p)
  a = p.parse_args(argv)
  distributed.initialize_from_args(a)
  from d2v_jax.checkpoint import NoCheckpoint
  from d2v_jax.export import ExportError
  try:
    res = probe(a.workdir, a.data, weights=a.weights, layer=a.layer, random_init=a.random_init,
                baseline=a.baseline, step=a.step, seed=a.seed, test_frac=a.test_frac, k=a.k,
                c=a.C, init_seed=a.init_seed, repeats=a.repeats)
  except (ConfigError, ExportError, NoCheckpoint, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2)
  if res is None:
    return   # not process 0: it joined the restore; process 0 probes and reports
  print(format_table(res))
  tag = "random" if a.random_init else a.weights + ("+random" if a.baseline else "")
  data_name = os.path.splitext(os.path.basename(os.path.normpath(a.data)))[0]
  out = a.out or os.path.join(a.workdir, "probe", f"{data_name}_{tag}_layer{res['layer']}.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(res, f, indent=2)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
