"""The released fairseq data2vec recipes import at full size: each base config of
examples/data2vec/config (v1 text / audio / vision port, v2 text / audio / images), merged
with its dataclass defaults as fairseq's hydra does, builds fairseq's own model; its state dict
(EMA teacher included) goes through our importer onto the recipe its cfg names, and every
weight finds its place with the right shape (d2v_jax/fairseq_io; no forward pass: the tiny
parity tests check the numbers)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from d2v_jax import config as config_lib, validate
from d2v_jax.fairseq_io import arch, ckpt, convert, layouts
from d2v_jax.hf import common as hf_common

# (yaml under examples/data2vec/config, our recipe, expected: layers, width, top_k, teacher subtrees)
RELEASED = [
    ("v2/base_text_only_task.yaml", "configs/text.py:variant=base,v2", (12, 768, 12, ("encoder",))),
    ("v2/base_audio_only_task.yaml", "configs/audio.py:variant=base,v2",
     (12, 768, 8, ("encoder", "embed/pos_conv_*", "embed/alibi_scale"))),
    ("v2/base_images_only_task.yaml", "configs/vision.py:variant=base,v2", (12, 768, 10, ("embed", "encoder"))),
    ("text/pretraining/base.yaml", "configs/text.py:variant=base", (12, 768, 10, ("encoder",))),
    ("audio/pretraining/base_librispeech.yaml", "configs/audio.py:variant=base", (12, 768, 8, ("encoder",))),
    ("vision/pretraining/base_imagenet_d2v1.yaml", "configs/vision.py:variant=base",
     (12, 768, 6, ("encoder", "embed/rel_pos_bias"))),
]


def _fairseq_model(fs, yaml_path: str):
  """fairseq's model of a released yaml (its model section over the dataclass defaults) and its
  cfg as the checkpoint would carry it."""
  from omegaconf import OmegaConf
  y = OmegaConf.load(f"{fs.src}/fairseq/examples/data2vec/config/{yaml_path}")
  name = y.model._name
  dc = {"data2vec_multi": fs.data2vec2.Data2VecMultiConfig,
        "data2vec_text": fs.data2vec_text.Data2VecTextConfig,
        "data2vec_audio": fs.data2vec_audio.Data2VecAudioConfig,
        "data2vec_vision": fs.data2vec_vision.Data2VecVisionConfig}[name]
  model_yaml = OmegaConf.masked_copy(y.model, [k for k in y.model if k != "_name"])
  root = OmegaConf.create({"model": OmegaConf.merge(OmegaConf.structured(dc), model_yaml),
                           "optimization": {"max_update": 400_000}, "common": {"seed": 1},
                           "task": {"tokens_per_sample": 512}})
  if name == "data2vec_text":   # TransformerConfig's decoder dims point at a model.decoder that
    for k in ("input_dim", "output_dim"):   # only fairseq's translation models have
      OmegaConf.update(root, f"model.transformer.decoder.{k}", 768)
  vocab = fs.Dictionary()
  for i in range(50260):   # RoBERTa's dict.txt has 50,260 lines
    vocab.add_symbol(str(i))
  vocab.add_symbol("<mask>")

  class Task:
    source_dictionary = vocab

    class cfg:
      data = ""
  cls = {"data2vec_multi": fs.data2vec2.Data2VecMultiModel,
         "data2vec_text": fs.data2vec_text.Data2VecTextModel,
         "data2vec_audio": fs.data2vec_audio.Data2VecAudioModel,
         "data2vec_vision": fs.data2vec_vision.Data2VecVisionModel}[name]
  model = cls.build_model(root.model, Task)
  if name != "data2vec_multi":
    model.set_num_updates(0)   # 1.0 models make their EMA teacher here
  model_cfg = ckpt.plain(root)["model"]   # as the importer reads a checkpoint's cfg
  return model, {**model_cfg, "_name": name}


@pytest.mark.parametrize("yaml_path,spec,expected", RELEASED, ids=[r[0] for r in RELEASED])
def test_released_recipe_imports_at_full_size(fs, yaml_path, spec, expected):
  model, model_cfg = _fairseq_model(fs, yaml_path)
  state = {}
  for k, v in model.state_dict().items():
    state[k] = ({kk: vv.numpy() for kk, vv in v.items()} if isinstance(v, dict)
                else v.detach().float().numpy())
  layout = layouts.layout(model_cfg)
  cfg = config_lib.load_file(spec)
  for key, value in arch.settings(model_cfg, state, layout).items():
    config_lib.set_path(cfg, key, value)
  validate.validate(cfg)
  layers, width, top_k, subtrees = expected
  assert (cfg.model.encoder.num_layers, cfg.model.encoder.hidden, cfg.target.top_k) == (layers, width, top_k)
  assert tuple(cfg.teacher.ema_subtrees) == subtrees
  shapes = hf_common.our_shapes(cfg)
  params = convert.from_state(layout, state, shapes, scan=True)
  teacher = convert.teacher_from_state(layout, state, shapes, True, cfg.teacher.ema_subtrees)
  ours = sum(x.size for x in jax.tree_util.tree_leaves(params))
  theirs = sum(v.size for k, v in state.items() if not isinstance(v, dict)
               and k in convert.expected(layout, shapes))
  assert ours >= theirs > 50e6   # every fairseq weight placed (ours adds only layout.fill)
  assert teacher is not None and len(jax.tree_util.tree_leaves(teacher)) > 10
  # the teacher read from fairseq's EMA dict is fairseq's copy of the student at init
  enc = teacher["encoder"]["layers"]["block"]["fc1"]["kernel"]
  np.testing.assert_allclose(enc, params["encoder"]["layers"]["block"]["fc1"]["kernel"], atol=1e-6)
