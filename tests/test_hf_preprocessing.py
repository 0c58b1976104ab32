"""Preprocessing travels with the export (issue 5, item 3): raw input -> the export's
AutoTokenizer / AutoImageProcessor / AutoFeatureExtractor -> AutoModel gives the features that
raw input -> our data pipeline (no masking) -> our model gives.

Stated tolerances: text and same-size images <= 1e-4 (identical model inputs); a resized image
differs by at most one uint8 level per pixel (PIL rounds its bicubic output to uint8, our
tf.image.resize keeps floats), so the pixels agree to 1/255/std and the features to 0.05;
audio normalisation uses eps 1e-5 (fairseq F.layer_norm, ours) where Wav2Vec2FeatureExtractor
uses 1e-7, so input values differ by the factor sqrt((var+1e-5)/(var+1e-7)) (checked exactly)
and features by <= 1e-3 on a waveform of variance ~0.05.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import tensorflow as tf
import torch
import transformers as T
from PIL import Image
from sklearn.datasets import load_sample_image

from d2v_jax import config as config_lib
from d2v_jax.data import text_corpus
from d2v_jax.data import audio as audio_data, text as text_data, vision as vision_data
from d2v_jax.modality import load as load_modality
from hf_utils import SENTENCES, max_abs
from test_hf_heads import ROOT, audio_cfg, export_random

TOL = 1e-4
RAW_TEXT = ["And God called the light Day, and the darkness he called Night.",
            "Let there be light."]


def hf_features(out_dir: str, **inputs) -> np.ndarray:
  model = T.AutoModel.from_pretrained(out_dir).eval()
  with torch.no_grad():
    return model(**{k: torch.as_tensor(v) for k, v in inputs.items()}).last_hidden_state.numpy()


def test_text_tokenizer_and_packing(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n\n".join(SENTENCES * 8) + "\n")
  workdir = str(tmp_path / "run")
  cfg = config_lib.load_file(os.path.join(ROOT, "configs/text.py:variant=tiny"))
  cfg.data.path, cfg.data.vocab_size, cfg.data.block_size = str(corpus), 300, 32
  text_data.prepare(cfg, workdir)  # trains the run's tokenizer into WORKDIR/tokenizer
  tok = text_data.resolve_tokenizer(cfg, workdir)

  # ours: the corpus reader + tokenizer of the run, each document packed as <s> tokens </s>
  raw = tmp_path / "raw.txt"
  raw.write_text("\n\n".join(RAW_TEXT) + "\n")
  single = config_lib.from_dict(config_lib.to_dict(cfg))
  single.data.path = str(raw)
  stream = text_corpus.token_stream(single, tok)
  ends = np.flatnonzero(stream == tok.sep_token_id)
  docs = np.split(stream, ends + 1)[:-1]
  rows = [text_corpus.pack(d[:-1], len(d) + 1, tok.cls_token_id, tok.sep_token_id)[0] for d in docs]
  ours_ids = np.full((len(rows), max(map(len, rows))), cfg.model.pad_id, np.int64)
  for r, row in enumerate(rows):
    ours_ids[r, :len(row)] = row

  out = str(tmp_path / "hf")
  _, ours = export_random(cfg, {"source": ours_ids, "student": ours_ids}, out, workdir)
  hf_tok = T.AutoTokenizer.from_pretrained(out)
  enc = hf_tok(RAW_TEXT, padding=True, return_tensors="np")
  np.testing.assert_array_equal(enc["input_ids"], ours_ids)
  assert (enc["input_ids"][:, 0] == 0).all() and len(set(map(len, rows))) == 2  # <s> first; padded
  ref = hf_features(out, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
  err = max_abs(ours, ref, enc["attention_mask"].astype(bool))
  print(f"text preprocessing: ids equal, features {err:.2e}")
  assert err <= TOL


@pytest.fixture(scope="module")
def vision_env(tmp_path_factory):
  work = tmp_path_factory.mktemp("vision")
  cfg = config_lib.load_file(os.path.join(ROOT, "configs/vision.py:variant=tiny,runlocal"))
  load_modality("vision").data.prepare(cfg, "")
  s = cfg.model.image_size
  out = str(work / "hf")
  params, _ = export_random(cfg, {"image": np.zeros((1, s, s, 3), np.float32)}, out, str(work))
  # our pipeline without augmentation: whole image, bicubic resize, no flip / jitter
  plain = config_lib.from_dict(config_lib.to_dict(cfg))
  plain.data.crop_scale, plain.data.crop_ratio = (1.0, 1.0), (0.1, 10.0)
  plain.data.flip, plain.data.color_jitter = False, (0.0, 0.0, 0.0)
  return cfg, plain, params, out


def ours_vision(plain, params, png: bytes) -> tuple[np.ndarray, np.ndarray]:
  import jax
  from d2v_jax.models import data2vec, vision
  img = vision_data.load_example(tf.constant(""), tf.constant(0, tf.int64), plain, read_file=False,
                                 data=tf.constant(png))["image"].numpy()[None]
  model = data2vec.build(plain, vision.build(plain))
  final = jax.jit(lambda p, b: model.apply({"params": p}, b, student=False)["final"])(params, {"image": img})
  return img, np.asarray(final)


@pytest.mark.parametrize("crop", ["same_size", "resized"])
def test_image_processor(vision_env, crop):
  cfg, plain, params, out = vision_env
  china = load_sample_image("china.jpg")  # a real photo shipped with scikit-learn, 427 x 640
  s = cfg.model.image_size
  raw = china[100:100 + s, 200:200 + s] if crop == "same_size" else china
  buf = io.BytesIO()
  Image.fromarray(raw).save(buf, format="PNG")  # lossless: both sides decode the same pixels
  ours_px, ours = ours_vision(plain, params, buf.getvalue())

  proc = T.AutoImageProcessor.from_pretrained(out)
  assert (proc.size["height"], proc.size["width"]) == (s, s)
  assert tuple(proc.image_mean) == tuple(cfg.data.mean) and tuple(proc.image_std) == tuple(cfg.data.std)
  pixels = proc(raw, return_tensors="np")["pixel_values"]
  assert pixels.shape == (1, 3, s, s)
  px_err = max_abs(pixels.transpose(0, 2, 3, 1), ours_px)
  err = max_abs(ours, hf_features(out, pixel_values=pixels))
  print(f"image {crop}: pixels {px_err:.2e}, features {err:.2e}")
  if crop == "same_size":
    assert px_err <= 1e-5 and err <= TOL
  else:
    assert px_err <= 1.01 / 255 / min(cfg.data.std)  # one uint8 level
    assert err <= 0.05


def test_feature_extractor(tmp_path):
  cfg = audio_cfg()
  rng = np.random.default_rng(0)
  t = np.arange(8000) / 16000
  raw = [(0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.normal(size=8000)).astype(np.float32),
         (0.2 * rng.normal(size=5321)).astype(np.float32)]
  lengths = np.array([len(w) for w in raw], np.int32)
  # ours: the pipeline's per-utterance normalisation, zero right-padding, audio_len
  audio = np.zeros((2, 8000), np.float32)
  for i, w in enumerate(raw):
    audio[i, :len(w)] = audio_data.normalize(tf.constant(w)).numpy()
  out = str(tmp_path / "hf")
  _, ours = export_random(cfg, {"audio": audio, "audio_len": lengths}, out, str(tmp_path))

  fe = T.AutoFeatureExtractor.from_pretrained(out)
  assert fe.sampling_rate == cfg.data.sample_rate and fe.do_normalize and fe.return_attention_mask
  enc = fe(raw, sampling_rate=16000, padding=True, return_tensors="np")
  values, attn = enc["input_values"], enc["attention_mask"]
  np.testing.assert_array_equal(attn.sum(1), lengths)
  for i, w in enumerate(raw):  # the only difference is the variance eps (1e-5 vs 1e-7)
    v = np.var(w, dtype=np.float64)
    np.testing.assert_allclose(values[i, :len(w)], audio[i, :len(w)] * np.sqrt((v + 1e-5) / (v + 1e-7)),
                               atol=1e-5)
    assert not values[i, len(w):].any()
  ref = hf_features(out, input_values=values, attention_mask=attn)
  model = T.AutoModel.from_pretrained(out)
  frames = model._get_feat_extract_output_lengths(torch.tensor(lengths)).numpy()
  valid = np.arange(ours.shape[1])[None] < frames[:, None]
  err = max_abs(ours, ref, valid)
  print(f"audio preprocessing: features {err:.2e}")
  assert err <= 1e-3
