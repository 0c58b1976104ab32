"""Every transformers head class a practitioner fine-tunes loads our export (issue 5, items 1-2).

For each class: no unexpected and no mismatched weights, the missing ones are the task head
only (plus the pooler where the class adds one), every exported tensor arrives bitwise in the
class's base model, and one forward pass gives the base model's hidden states (so the encoder
really is ours) with the head's output shape. The base classes are also compared with our
JAX model (<= 1e-4), FlaxBeitModel and the TF vision classes with PyTorch (<= 1e-4).
Exports are tiny, randomly initialised and perturbed (biases / norms not at their init).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import flax
import jax
import numpy as np
import pytest
import torch
import transformers as T
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file

from d2v_jax import config as config_lib
from d2v_jax.hf import common
from d2v_jax.modality import load as load_modality
from d2v_jax.models import data2vec
from hf_utils import SENTENCES, max_abs, train_tiny_bpe

TOL = 1e-4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def export_random(cfg, batch, out_dir: str, workdir: str, seed: int = 0):
  """Perturbed random params of our model -> HF export; returns (params, our final output)."""
  mod = load_modality(cfg.modality)
  model = data2vec.build(cfg, mod.model.build(cfg))
  init_batch = mod.data.example_batch(cfg, 2)
  params = jax.jit(lambda k: model.init({"params": k, "dropout": k}, init_batch, student=True))(
      jax.random.PRNGKey(seed))["params"]
  leaves, treedef = jax.tree_util.tree_flatten(common.unbox(params))
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_unflatten(treedef, [x + rng.normal(0, 0.05, x.shape).astype(np.float32)
                                                  for x in leaves])
  common.export(mod.hf(), params, cfg, out_dir, workdir)
  final = jax.jit(lambda p, b: model.apply({"params": p}, b, student=False, deterministic=True)["final"])(
      params, batch)
  return params, np.asarray(final)


def load_checked(cls, out_dir: str, head: tuple[str, ...], **kw):
  """from_pretrained + the loading-info contract; returns the model in eval mode."""
  model, info = cls.from_pretrained(out_dir, output_loading_info=True, **kw)
  name = cls.__name__
  assert not info["unexpected_keys"], (name, info["unexpected_keys"])
  assert not info["mismatched_keys"], (name, info["mismatched_keys"])
  missing = info["missing_keys"]
  assert all(k.startswith(head) for k in missing), (name, missing)
  assert bool(missing) == bool(head), (name, missing)  # a head class has its head missing
  exported = load_file(os.path.join(out_dir, "model.safetensors"))
  base = model.base_model.state_dict()
  for k, v in exported.items():
    np.testing.assert_array_equal(base[k].numpy(), v, err_msg=f"{name}: {k}")
  return model.eval()


def run(model, **inputs):
  with torch.no_grad():
    return model(**{k: torch.as_tensor(v) for k, v in inputs.items()}, output_hidden_states=True)


# ------------------------------------------------------------------------------------ text


@pytest.fixture(scope="module")
def text_export(tmp_path_factory):
  work = tmp_path_factory.mktemp("text")
  tok = train_tiny_bpe(str(work / "run" / "tokenizer"))
  cfg = config_lib.load_file(os.path.join(ROOT, "configs/text.py:variant=tiny"))
  cfg.model.vocab_size = len(tok)
  enc = tok(SENTENCES[:3], padding=True, return_tensors="np")
  ids, mask = enc["input_ids"], enc["attention_mask"]
  out = str(work / "hf")
  _, ours = export_random(cfg, {"source": ids, "student": ids}, out, str(work / "run"))
  base = load_checked(T.AutoModel, out, ("pooler.",))
  ref = run(base, input_ids=ids, attention_mask=mask)
  return out, ids, mask, ours, ref, len(tok)


def test_text_base_model_matches_ours(text_export):
  out, ids, mask, ours, ref, _ = text_export
  valid = mask.astype(bool)
  err = max_abs(ours, ref.last_hidden_state.numpy(), valid)
  print(f"text: ours vs Data2VecTextModel {err:.2e}")
  assert err <= TOL


TEXT_HEADS = [
    # class, head weights, kwargs, (output field, shape given B, T, V)
    (T.Data2VecTextForMaskedLM, ("lm_head.",), {}, ("logits", lambda b, t, v: (b, t, v))),
    (T.Data2VecTextForCausalLM, ("lm_head.",), {"is_decoder": True}, ("logits", lambda b, t, v: (b, t, v))),
    (T.Data2VecTextForSequenceClassification, ("classifier.",), {"num_labels": 3},
     ("logits", lambda b, t, v: (b, 3))),
    (T.Data2VecTextForTokenClassification, ("classifier.",), {"num_labels": 5},
     ("logits", lambda b, t, v: (b, t, 5))),
    (T.Data2VecTextForQuestionAnswering, ("qa_outputs.",), {}, ("start_logits", lambda b, t, v: (b, t))),
]


@pytest.mark.parametrize("cls,head,kw,out_spec", TEXT_HEADS, ids=lambda x: getattr(x, "__name__", ""))
def test_text_heads(text_export, cls, head, kw, out_spec):
  out, ids, mask, _, ref, vocab = text_export
  model = load_checked(cls, out, head, **kw)
  got = run(model, input_ids=ids, attention_mask=mask)
  field, shape = out_spec
  assert tuple(getattr(got, field).shape) == shape(*ids.shape, vocab)
  assert torch.isfinite(getattr(got, field)).all()
  valid = mask.astype(bool)
  if kw.get("is_decoder"):  # causal attention: only the embeddings are comparable
    assert max_abs(got.hidden_states[0].numpy(), ref.hidden_states[0].numpy(), valid) <= 1e-6
    assert max_abs(got.hidden_states[-1].numpy(), ref.hidden_states[-1].numpy(), valid) > 1e-3
  else:
    assert max_abs(got.hidden_states[-1].numpy(), ref.hidden_states[-1].numpy(), valid) <= 1e-5


def test_text_multiple_choice(text_export):
  out, ids, mask, _, ref, _ = text_export
  model = load_checked(T.Data2VecTextForMultipleChoice, out, ("classifier.", "data2vec_text.pooler."))
  choices = np.stack([ids, ids], axis=1)  # [B, 2 choices, T], both the same sentence
  got = run(model, input_ids=choices, attention_mask=np.stack([mask, mask], axis=1))
  assert got.logits.shape == (ids.shape[0], 2)
  np.testing.assert_allclose(got.logits[:, 0].numpy(), got.logits[:, 1].numpy(), atol=1e-6)
  hidden = got.hidden_states[-1].numpy().reshape(ids.shape[0], 2, ids.shape[1], -1)[:, 0]
  assert max_abs(hidden, ref.hidden_states[-1].numpy(), mask.astype(bool)) <= 1e-5


# ---------------------------------------------------------------------------------- vision


@pytest.fixture(scope="module")
def vision_export(tmp_path_factory):
  work = tmp_path_factory.mktemp("vision")
  cfg = config_lib.load_file(os.path.join(ROOT, "configs/vision.py:variant=tiny,runlocal"))
  load_modality("vision").data.prepare(cfg, "")
  s = cfg.model.image_size
  nhwc = np.random.default_rng(1).normal(size=(2, s, s, 3)).astype(np.float32)
  out = str(work / "hf")
  _, ours = export_random(cfg, {"image": nhwc}, out, str(work))
  pixels = np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2))
  base = load_checked(T.AutoModel, out, ())
  ref = run(base, pixel_values=pixels)
  return out, pixels, ours, ref, cfg


def test_vision_base_model_and_flax(vision_export):
  out, pixels, ours, ref, _ = vision_export
  err = max_abs(ours, ref.last_hidden_state.numpy())
  flax_model, flax_params = T.FlaxBeitModel.from_pretrained(out, _do_init=False)
  with open(os.path.join(out, "flax_model.msgpack"), "rb") as f:
    written = set(flatten_dict(flax.serialization.msgpack_restore(f.read())))
  assert written == flax_model.required_params  # nothing missing, nothing unexpected
  flax_out = flax_model(pixels, params=flax_params, output_hidden_states=True)
  err_flax = max(max_abs(flax_out.last_hidden_state, ref.last_hidden_state.numpy()),
                 *(max_abs(a, b.numpy()) for a, b in zip(flax_out.hidden_states, ref.hidden_states)))
  print(f"vision: ours vs Data2VecVisionModel {err:.2e}, FlaxBeitModel vs torch {err_flax:.2e}")
  assert err <= TOL and err_flax <= TOL


def test_vision_image_classification(vision_export):
  out, pixels, _, ref, _ = vision_export
  model = load_checked(T.Data2VecVisionForImageClassification, out, ("classifier.",), num_labels=4)
  got = run(model, pixel_values=pixels, labels=np.array([0, 3]))
  assert got.logits.shape == (2, 4) and torch.isfinite(got.loss)
  assert max_abs(got.hidden_states[-1].numpy(), ref.hidden_states[-1].numpy()) <= 1e-5


def reset_batchnorm_(model) -> int:
  """transformers 4.57 leaves the BatchNorm2d weight / bias of a newly added segmentation head
  uninitialised (torch.empty) when it loads a checkpoint without that head; reset them."""
  n = 0
  for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.reset_parameters()
      n += 1
  return n


def test_vision_semantic_segmentation(vision_export):
  out, pixels, _, ref, cfg = vision_export
  depth = cfg.model.encoder.num_layers
  # four feature maps for the UperNet head: hidden_states[1..4] of the 4-layer tiny model
  model = load_checked(T.Data2VecVisionForSemanticSegmentation, out,
                       ("decode_head.", "auxiliary_head.", "fpn1.", "fpn2."), num_labels=3,
                       out_indices=list(range(1, depth + 1))[-4:])
  assert reset_batchnorm_(model) > 0
  assert all(torch.isfinite(p).all() for p in model.parameters())
  s = cfg.model.image_size
  labels = np.random.default_rng(0).integers(0, 3, (2, s, s))
  got = run(model, pixel_values=pixels, labels=labels)
  grid = s // cfg.model.patch_size
  assert got.logits.shape == (2, 3, 4 * grid, 4 * grid)  # the UperNet head's stride-4 map
  assert torch.isfinite(got.logits).all() and 0 < float(got.loss) < 10
  assert max_abs(got.hidden_states[-1].numpy(), ref.hidden_states[-1].numpy()) <= 1e-5


TF_SCRIPT = textwrap.dedent(r"""
  import sys, json
  import numpy as np
  import tf_keras as keras
  import transformers as T
  from transformers.models.data2vec import modeling_tf_data2vec_vision as tfdv

  # transformers 4.57 builds the TF main layer's final LayerNorm for 2-D input
  # (layernorm.build((None, hidden))), so with use_mean_pooling=False (the pretraining layout)
  # it fails on the [B, T, D] sequence; normalise over the last axis of 3-D input instead.
  _build = tfdv.TFData2VecVisionMainLayer.build
  def build(self, input_shape=None):
    _build(self, input_shape)
    if isinstance(getattr(self, "layernorm", None), keras.layers.LayerNormalization):
      self.layernorm.axis = [2]
  tfdv.TFData2VecVisionMainLayer.build = build

  out_dir, pixels_path, result = sys.argv[1:4]
  pixels = np.load(pixels_path)
  res, arrays = {}, {}
  for name, kw in [("TFData2VecVisionModel", {}),
                   ("TFData2VecVisionForImageClassification", {"num_labels": 4}),
                   ("TFData2VecVisionForSemanticSegmentation", {"num_labels": 3, "out_indices": [1, 2, 3, 4]})]:
    model, info = getattr(T, name).from_pretrained(out_dir, from_pt=True, output_loading_info=True, **kw)
    o = model(pixel_values=pixels, output_hidden_states=True)
    res[name] = {k: sorted(v) for k, v in info.items()}
    res[name]["shape"] = list(o.last_hidden_state.shape if name == "TFData2VecVisionModel" else o.logits.shape)
    for i, h in enumerate(o.hidden_states):
      arrays[f"{name}.h{i}"] = h.numpy()
    if name == "TFData2VecVisionModel":
      arrays["last"] = o.last_hidden_state.numpy()
  np.savez(result + ".npz", **arrays)
  json.dump(res, open(result, "w"))
""")


def test_vision_tf_classes(vision_export, tmp_path):
  if importlib.util.find_spec("tf_keras") is None:
    pytest.skip("tf-keras is not installed: transformers' TF classes need it under Keras 3 "
                "(pip install tf-keras)")
  out, pixels, _, ref, cfg = vision_export
  np.save(tmp_path / "pixels.npy", pixels)
  script = tmp_path / "tf_check.py"
  script.write_text(TF_SCRIPT)
  # USE_TF=1 would switch PyTorch off (from_pt needs it): both on AUTO
  env = dict(os.environ, USE_TF="AUTO", USE_TORCH="AUTO", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
  result = str(tmp_path / "tf.json")
  proc = subprocess.run([sys.executable, str(script), out, str(tmp_path / "pixels.npy"), result],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  import json
  with open(result) as f:
    res = json.load(f)
  arrays = dict(np.load(result + ".npz"))
  heads = {"TFData2VecVisionModel": (), "TFData2VecVisionForImageClassification": ("classifier.",),
           "TFData2VecVisionForSemanticSegmentation": ("decode_head.", "auxiliary_head.", "fpn1.", "fpn2.")}
  s = cfg.model.image_size
  shapes = {"TFData2VecVisionModel": [2, (s // cfg.model.patch_size) ** 2 + 1, cfg.model.encoder.hidden],
            "TFData2VecVisionForImageClassification": [2, 4],
            "TFData2VecVisionForSemanticSegmentation": [2, 3] + [4 * s // cfg.model.patch_size] * 2}
  errs = {}
  for name, info in res.items():
    assert not info["unexpected_keys"] and not info["mismatched_keys"], (name, info)
    assert all(k.startswith(heads[name]) for k in info["missing_keys"]), (name, info["missing_keys"])
    assert bool(info["missing_keys"]) == bool(heads[name]), name
    assert info["shape"] == shapes[name], name
    errs[name] = max(max_abs(arrays[f"{name}.h{i}"], h.numpy()) for i, h in enumerate(ref.hidden_states))
  errs["last"] = max_abs(arrays["last"], ref.last_hidden_state.numpy())
  print("TF vs torch: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
  assert max(errs.values()) <= TOL, errs


# ----------------------------------------------------------------------------------- audio


def audio_cfg():
  """configs/audio.py tiny, narrowed to 32 channels (CPU time) and 0.5 s crops."""
  cfg = config_lib.load_file(os.path.join(ROOT, "configs/audio.py:variant=tiny"))
  enc = cfg.model.encoder
  enc.hidden, enc.mlp_dim = 32, 64
  cfg.model.conv_dims, cfg.model.pos_conv_groups = (32,) * 7, 4
  cfg.data.max_samples, cfg.data.min_samples = 8000, 4000
  return cfg


@pytest.fixture(scope="module")
def audio_export(tmp_path_factory):
  work = tmp_path_factory.mktemp("audio")
  cfg = audio_cfg()
  lengths = np.array([8000, 5321], np.int32)
  audio = np.random.default_rng(2).normal(size=(2, 8000)).astype(np.float32)
  audio[1, lengths[1]:] = 0.0
  out = str(work / "hf")
  _, ours = export_random(cfg, {"audio": audio, "audio_len": lengths}, out, str(work))
  attn = (np.arange(8000)[None] < lengths[:, None]).astype(np.int64)
  base = load_checked(T.AutoModel, out, ())
  ref = run(base, input_values=audio, attention_mask=attn)
  frames = base._get_feat_extract_output_lengths(torch.tensor(lengths)).numpy()
  valid = np.arange(ours.shape[1])[None] < frames[:, None]
  return out, audio, attn, ours, ref, valid


def test_audio_base_model_matches_ours(audio_export):
  out, audio, attn, ours, ref, valid = audio_export
  err = max_abs(ours, ref.last_hidden_state.numpy(), valid)
  print(f"audio: ours vs Data2VecAudioModel {err:.2e}")
  assert err <= TOL and not valid.all()


AUDIO_HEADS = [
    (T.Data2VecAudioForCTC, ("lm_head.",), {}, ("logits", lambda b, t: (b, t, 32))),
    (T.Data2VecAudioForSequenceClassification, ("projector.", "classifier."), {"num_labels": 3},
     ("logits", lambda b, t: (b, 3))),
    (T.Data2VecAudioForAudioFrameClassification, ("classifier.",), {"num_labels": 4},
     ("logits", lambda b, t: (b, t, 4))),
    (T.Data2VecAudioForXVector, ("projector.", "tdnn.", "feature_extractor.", "classifier.", "objective."),
     {"num_labels": 5}, ("embeddings", lambda b, t: (b, 512))),  # xvector_output_dim
]


@pytest.mark.parametrize("cls,head,kw,out_spec", AUDIO_HEADS, ids=lambda x: getattr(x, "__name__", ""))
def test_audio_heads(audio_export, cls, head, kw, out_spec):
  out, audio, attn, _, ref, valid = audio_export
  model = load_checked(cls, out, head, **kw)
  got = run(model, input_values=audio, attention_mask=attn)
  field, shape = out_spec
  assert tuple(getattr(got, field).shape) == shape(audio.shape[0], valid.shape[1])
  assert torch.isfinite(getattr(got, field)).all()
  assert max_abs(got.hidden_states[-1].numpy(), ref.hidden_states[-1].numpy(), valid) <= 1e-5


# -------------------------------------------- docs/finetune.md "Fine-tune the export" snippets

FINETUNE_DOC = os.path.join("docs", "finetune.md")


def doc_snippets() -> list[str]:
  """The python blocks of the "## Fine-tune the export" section (up to the next "## ")."""
  import re
  with open(os.path.join(ROOT, FINETUNE_DOC)) as f:
    text = f.read()
  start = text.index("## Fine-tune the export")
  end = text.find("\n## ", start + 1)
  section = text[start:end if end >= 0 else len(text)]
  return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.mark.parametrize("index", range(len(doc_snippets())))
def test_docs_snippet_runs(index, request):
  """Each fine-tuning snippet of docs/finetune.md runs on the matching tiny export."""
  import re
  code = doc_snippets()[index]
  if "TFData2Vec" in code:
    pytest.skip("TF snippet: its LayerNorm fix is exercised by test_vision_tf_classes (subprocess)")
  line = re.search(r'HF_DIR = "runs/(\w+)_base/hf"', code)
  assert line, f"snippet {index} sets no HF_DIR = \"runs/<modality>_base/hf\""
  out = request.getfixturevalue(f"{line.group(1)}_export")[0]
  namespace: dict = {}
  exec(compile(code.replace(line.group(0), f"HF_DIR = {out!r}"), f"{FINETUNE_DOC}#finetune-{index}", "exec"),
       namespace)
  for name in ("loss", "features", "logits"):
    if name in namespace:
      assert np.isfinite(np.asarray(namespace[name].detach() if hasattr(namespace[name], "detach")
                                    else namespace[name])).all(), name
