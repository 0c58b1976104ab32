"""d2v_jax/hf/text.py: parity with transformers Data2VecTextModel / FlaxRobertaModel, round trips."""

import json
import os

import flax
import jax
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict
from transformers import AutoModel, AutoTokenizer, Data2VecTextModel, FlaxRobertaModel

from d2v_jax import config as config_lib
from d2v_jax.hf import common
from d2v_jax.hf import text as hf_text
from d2v_jax.models import data2vec, text
from hf_utils import SENTENCES, max_abs, perturb_, torch_state, train_tiny_bpe

TOL = 1e-4
TEXT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "text.py")


def tiny_cfg(scan: bool = True, vocab: int = 100):
  cfg = config_lib.load_file(TEXT_CONFIG + ":variant=tiny")
  if vocab is not None:
    cfg.model.vocab_size = vocab
  cfg.model.encoder.scan = scan
  return cfg


def our_model(cfg, collect: str):
  cfg = cfg.copy_and_resolve_references()
  cfg.target.layer_output = collect
  return data2vec.build(cfg, text.build(cfg))


def padded_ids(vocab: int, lengths=(12, 7, 3), seed: int = 0) -> np.ndarray:
  """<s> tokens </s> rows of different lengths, right-padded with pad id 1."""
  rng = np.random.default_rng(seed)
  ids = np.ones((len(lengths), max(lengths)), np.int64)
  for r, n in enumerate(lengths):
    ids[r, :n] = rng.integers(5, vocab, n)
    ids[r, 0], ids[r, n - 1] = 0, 2
  return ids


def init_params(cfg, seed: int = 0):
  ids = padded_ids(cfg.model.vocab_size)
  batch = {"source": ids, "student": ids}
  rngs = {"params": jax.random.PRNGKey(seed), "dropout": jax.random.PRNGKey(seed + 1)}
  return our_model(cfg, "ffn").init(rngs, batch, student=True)["params"]


def assert_trees_equal(a, b):
  fa, fb = flatten_dict(a), flatten_dict(b)
  assert set(fa) == set(fb)
  for k in fa:
    assert fa[k].shape == fb[k].shape, k
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=str(k))


@pytest.mark.parametrize("scan", [True, False])
def test_parity_with_hf_on_padded_batch(scan):
  cfg = tiny_cfg(scan)
  torch.manual_seed(0)
  hf = Data2VecTextModel(hf_text.hf_config(cfg)).eval()
  perturb_(hf, seed=1)
  params = common.from_hf_state(hf_text, torch_state(hf), cfg)

  ids = padded_ids(cfg.model.vocab_size)
  valid = ids != 1
  ffn_out = {}
  hooks = [layer.output.dense.register_forward_hook(
      lambda mod, inp, out, i=i: ffn_out.__setitem__(i, out.detach().numpy()))
      for i, layer in enumerate(hf.encoder.layer)]
  with torch.no_grad():
    ref = hf(torch.tensor(ids), attention_mask=torch.tensor(valid.astype(np.int64)),
             output_hidden_states=True)
  for h in hooks:
    h.remove()

  batch = {"source": ids}
  errs = {}
  for collect in ("end", "ffn"):
    out = our_model(cfg, collect).apply({"params": params}, batch, student=False, deterministic=True)
    np.testing.assert_array_equal(np.asarray(out["valid"]), valid)
    assert out["layers"].shape == (2, 3, 12, 64)
    errs["final"] = max_abs(out["final"], ref.last_hidden_state.numpy(), valid)
    for i in range(cfg.model.encoder.num_layers):
      want = ref.hidden_states[i + 1].numpy() if collect == "end" else ffn_out[i]
      errs[f"{collect}_{i}"] = max_abs(out["layers"][i], want, valid)
  print(f"parity scan={scan}: " + ", ".join(f"{k}={v:.2e}" for k, v in errs.items()))
  assert max(errs.values()) <= TOL, errs
  # the outputs are not trivially small: a 1e-4 tolerance is meaningful
  assert np.abs(ref.last_hidden_state.numpy()[valid]).mean() > 0.1


def test_export_round_trip(tmp_path):
  workdir, out_dir = str(tmp_path / "work"), str(tmp_path / "hf")
  tok = train_tiny_bpe(os.path.join(workdir, "tokenizer"))
  cfg = tiny_cfg(scan=True, vocab=len(tok))
  params = init_params(cfg, seed=3)
  # perturb biases / norms so a swapped or dropped leaf shows up in the outputs
  leaves, treedef = jax.tree_util.tree_flatten(common.unbox(params))
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_unflatten(
      treedef, [x + rng.normal(0, 0.05, x.shape).astype(np.float32) for x in leaves])
  common.export(hf_text, params, cfg, out_dir, workdir)

  assert {"config.json", "model.safetensors", "flax_model.msgpack", "d2v_config.json",
          "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out_dir))
  with open(os.path.join(out_dir, "config.json")) as f:
    hf_json = json.load(f)
  assert hf_json["model_type"] == "data2vec-text"
  assert hf_json["architectures"] == ["Data2VecTextModel"]
  assert (hf_json["vocab_size"], hf_json["max_position_embeddings"], hf_json["type_vocab_size"],
          hf_json["layer_norm_eps"], hf_json["pad_token_id"]) == (len(tok), 514, 1, 1e-5, 1)
  with open(os.path.join(out_dir, "d2v_config.json")) as f:
    assert json.load(f) == config_lib.to_dict(cfg)

  model, info = AutoModel.from_pretrained(out_dir, output_loading_info=True)
  assert type(model) is Data2VecTextModel
  assert sorted(info["missing_keys"]) == ["pooler.dense.bias", "pooler.dense.weight"]  # never trained: not exported
  assert not info["unexpected_keys"] and not info["mismatched_keys"]
  model.eval()

  tokenizer = AutoTokenizer.from_pretrained(out_dir)
  enc = tokenizer(SENTENCES[:3], padding=True, return_tensors="np")
  ids, mask = enc["input_ids"], enc["attention_mask"]
  valid = mask.astype(bool)
  assert tokenizer.pad_token_id == 1 and (ids[~valid] == 1).all() and not valid.all()
  with torch.no_grad():
    ref = model(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  ours = our_model(cfg, "ffn").apply({"params": params}, {"student": ids, "source": ids},
                                     student=True, deterministic=True)["final"]
  err_pt = max_abs(ours, ref, valid)

  flax_model, flax_params = FlaxRobertaModel.from_pretrained(out_dir, _do_init=False)
  with open(os.path.join(out_dir, "flax_model.msgpack"), "rb") as f:
    written = set(flatten_dict(flax.serialization.msgpack_restore(f.read())))
  assert written == flax_model.required_params  # nothing missing, nothing unexpected
  flax_out = flax_model(ids, attention_mask=mask, params=flax_params).last_hidden_state
  err_flax = max_abs(flax_out, ref, valid)
  print(f"export: ours vs torch {err_pt:.2e}, flax vs torch {err_flax:.2e}")
  assert err_pt <= TOL and err_flax <= TOL

  loaded = common.load(hf_text, out_dir, cfg)
  assert_trees_equal(loaded, {k: v for k, v in params.items() if k != "head"})


@pytest.mark.parametrize("scan", [True, False])
def test_import_round_trip_is_exact(scan):
  cfg = tiny_cfg(scan)
  params = common.unbox(init_params(cfg))
  state = common.to_hf_state(hf_text, params, cfg)
  assert set(state) == set(common.expected_shapes(hf_text, cfg))   # no pooler: never trained
  for name, shape in common.expected_shapes(hf_text, cfg).items():
    assert state[name].shape == shape, name
  want = {"embed": params["embed"], "encoder": params["encoder"]}
  assert_trees_equal(common.from_hf_state(hf_text, state, cfg), want)
  # HF head-model prefixes are accepted; extra heads / buffers are ignored
  for prefix in ("data2vec_text.", "roberta."):
    prefixed = {prefix + k: v for k, v in state.items()}
    prefixed["lm_head.bias"] = np.zeros(cfg.model.vocab_size, np.float32)
    assert_trees_equal(common.from_hf_state(hf_text, prefixed, cfg), want)
  # the other storage form holds the same layers
  other = tiny_cfg(not scan)
  converted = common.from_hf_state(hf_text, state, other)
  assert_trees_equal(common.set_layers({}, common.layer_list(converted["encoder"]), scan), want["encoder"])
  # the Flax tree's pooler (FlaxRoberta needs one) is the seeded HF-style init: N(0, 0.02), zero bias
  pooler = hf_text.pooler(cfg, seed=0)
  assert abs(pooler["kernel"].std() - 0.02) < 0.002 and not pooler["bias"].any()
  np.testing.assert_array_equal(pooler["kernel"], hf_text.pooler(cfg, seed=0)["kernel"])


def test_mismatch_and_missing_raise():
  cfg = tiny_cfg()
  state = common.to_hf_state(hf_text, init_params(cfg), cfg)
  bad = dict(state)
  bad["encoder.layer.1.intermediate.dense.weight"] = np.zeros((255, 64), np.float32)
  with pytest.raises(ValueError, match=r"encoder\.layer\.1\.intermediate\.dense\.weight.*\(255, 64\).*\(256, 64\)"):
    common.from_hf_state(hf_text, bad, cfg)
  missing = {k: v for k, v in state.items() if k != "encoder.layer.0.output.LayerNorm.bias"}
  with pytest.raises(ValueError, match=r"encoder\.layer\.0\.output\.LayerNorm\.bias"):
    common.from_hf_state(hf_text, missing, cfg)
  with pytest.raises(ValueError, match=r"embeddings\.word_embeddings\.weight.*\(100, 64\).*\(120, 64\)"):
    common.from_hf_state(hf_text, state, tiny_cfg(vocab=120))
  with pytest.raises(ValueError, match="word_embeddings"):
    words = state["embeddings.word_embeddings.weight"]
    common.from_hf_state(hf_text, {"bert.embeddings.word_embeddings.weight": words}, cfg)


def test_hf_config_fields_and_unrepresentable():
  cfg = tiny_cfg()
  c = hf_text.hf_config(cfg)
  assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size,
          c.max_position_embeddings, c.type_vocab_size, c.layer_norm_eps, c.pad_token_id,
          c.bos_token_id, c.eos_token_id, c.hidden_act, c.hidden_dropout_prob,
          c.attention_probs_dropout_prob) == (100, 64, 2, 2, 256, 514, 1, 1e-5, 1, 0, 2, "gelu", 0.1, 0.1)
  cfg.model.encoder.pre_ln = True
  with pytest.raises(config_lib.ConfigError, match="pre_ln"):
    hf_text.hf_config(cfg)
  cfg = tiny_cfg(vocab=None)
  with pytest.raises(config_lib.ConfigError, match="vocab_size"):
    hf_text.hf_config(cfg)


def test_export_without_tokenizer_says_where(tmp_path):
  cfg = tiny_cfg()
  with pytest.raises(ValueError, match="no tokenizer at .*tokenizer.*data.tokenizer"):
    common.export(hf_text, init_params(cfg), cfg, str(tmp_path / "hf"), str(tmp_path / "work"))


def test_export_rejects_tokenizer_with_other_pad_id(tmp_path):
  workdir = str(tmp_path / "work")
  tok = train_tiny_bpe(os.path.join(workdir, "tokenizer"))
  cfg = tiny_cfg(vocab=len(tok))
  cfg.model.pad_id = 0
  with pytest.raises(ValueError, match=r"pad_token_id=1 but model.pad_id=0"):
    common.export(hf_text, init_params(cfg), cfg, str(tmp_path / "hf"), workdir)
