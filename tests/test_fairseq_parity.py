"""Step parity with fairseq's own data2vec code, one row per objective and modality.

Each row builds a tiny fairseq model (random weights, dropout 0), imports it with our
fairseq importer, runs both on the same batch and masks, and asserts (tests/fairseq_parity.py):
teacher targets, predictions at the masked positions and the loss within 1e-5, the gradient
of every parameter fairseq trains within 1e-4 relative, and, after one of our full steps with
our updated student loaded into fairseq, fairseq's EMA teacher equal to ours within 1e-6.
Measured errors (float32, CPU) are printed and listed in docs/fairseq.md.
"""

from __future__ import annotations

import numpy as np

import fairseq_models as M
import fairseq_parity as P

TOL = dict(targets=1e-5, pred=1e-5, loss=1e-5, grad=1e-4, ema=1e-6)


def _check(name: str, ours, ref, ema_err, n_ema):
  err = P.compare(ours, ref)
  print(f"\n{name}: targets {err['targets']:.2e}  pred {err['pred']:.2e}  loss {err['loss']:.2e}  "
        f"grad {err['grad']:.2e} ({err['grad_worst']}, {err['n_grads']} params)  "
        f"ema {ema_err:.2e} ({n_ema} tensors)")
  assert not err["missing_grads"], err["missing_grads"]
  for key in ("targets", "pred", "loss", "grad"):
    assert err[key] <= TOL[key], (key, err)
  assert ema_err <= TOL["ema"], ema_err
  return err


# ------------------------------------------------------------------------------ v2 text


def test_v2_text_step_matches_fairseq(fs):
  torch = fs.torch
  vocab = M.dictionary(fs, 40)
  model, model_cfg = M.v2_text_model(fs, vocab)
  state = P.torch_state(model)
  cfg, layout = P.our_config(
      "configs/text.py:variant=tiny,v2", model_cfg, state,
      **{"data.path": "synthetic", "data.block_size": 12, "batch_size": 2, "seed": 0,
         "v2.mask_noise_std": 0.0, "model.embed_dropout": 0.0, "optim.warmup_steps": 0,
         "optim.lr": 1e-3, "optim.clip": 0.0})
  built, st, batch, ours = P.our_run(cfg, layout, state)

  ref = P.fairseq_v2_side(model, "TEXT", torch.from_numpy(batch["source"].astype(np.int64)),
                          batch, state, torch)
  ema_err, n, fs_ema, _ = P.ema_after_one_step(model, model.ema, layout, built, st, batch, torch)
  assert n == len(fs_ema)
  _check("v2 text", ours, ref, ema_err, n)


# ------------------------------------------------------------------------------ v2 audio


def test_v2_audio_step_matches_fairseq(fs):
  torch = fs.torch
  model, model_cfg = M.v2_audio_model(fs)
  state = P.torch_state(model)
  cfg, layout = P.our_config(
      "configs/audio.py:variant=tiny,v2", model_cfg, state,
      **{"data.max_samples": 1600, "data.min_samples": 1600, "data.buckets": (1600,),
         "batch_size": 2, "seed": 0,
         "optim.schedule": "cosine", "optim.warmup_steps": 0, "optim.lr": 1e-3,
         "optim.clip": 0.0, "guards.min_target_var": 0.0, "guards.min_pred_var": 0.0})
  assert cfg.model.alibi and "embed/alibi_scale" in cfg.teacher.ema_subtrees
  built, st, batch, ours = P.our_run(cfg, layout, state)

  ref = P.fairseq_v2_side(model, "AUDIO", torch.from_numpy(batch["audio"]), batch, state, torch)
  ema_err, n, fs_ema, ours_ema = P.ema_after_one_step(model, model.ema, layout, built, st, batch, torch)
  assert n == len(fs_ema), sorted(set(fs_ema) - set(ours_ema))
  _check("v2 audio", ours, ref, ema_err, n)


# ----------------------------------------------------------------------------- v2 images


def test_v2_image_step_matches_fairseq(fs):
  torch = fs.torch
  model, model_cfg = M.v2_image_model(fs)
  state = P.torch_state(model)
  rows = 2 * 2   # fairseq weights the CLS loss by the rows (images x clones) per GPU
  cfg, layout = P.our_config(
      "configs/vision.py:variant=tiny,v2", model_cfg, state,
      **{"batch_size": 2, "seed": 0, "v2.cls_loss": 0.01 * rows, "data.min_mask_block": 1,
         "optim.warmup_steps": 0,
         "optim.lr": 1e-3, "optim.clip": 0.0, "optim.init_lr_scale": 0.0})
  # fairseq's fixed table is ours (model.pos_embed = "sincos"), to float32 rounding
  from d2v_jax.models.vision import sincos_2d
  np.testing.assert_allclose(
      sincos_2d(32, 4), state["modality_encoders.IMAGE.fixed_positional_encoder.positions"][0],
      atol=1e-6)
  built, st, batch, ours = P.our_run(cfg, layout, state)

  image = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2)))
  ref = P.fairseq_v2_side(model, "IMAGE", image, batch, state, torch)
  ema_err, n, fs_ema, ours_ema = P.ema_after_one_step(model, model.ema, layout, built, st, batch, torch)
  assert set(fs_ema) - set(ours_ema) == {"modality_encoders.IMAGE.fixed_positional_encoder.positions"}
  _check("v2 images", ours, ref, ema_err, n)


# ------------------------------------------------------------------------------ v1 text


def test_v1_text_step_matches_fairseq(fs):
  torch = fs.torch
  vocab = M.dictionary(fs, 40)
  model, model_cfg = M.v1_text_model(fs, vocab)
  state = P.torch_state(model)
  cfg, layout = P.our_config(
      "configs/text.py:variant=tiny", model_cfg, state,
      **{"data.path": "synthetic", "data.block_size": 12, "batch_size": 2, "seed": 0,
         "optim.warmup_steps": 0, "optim.lr": 1e-3, "optim.clip": 0.0})
  built, st, batch, ours = P.our_run(cfg, layout, state)
  assert batch["mask"].sum() > 0 and (batch["student"][batch["mask"]] == len(vocab) - 1).all()

  model.train()
  captured = {}
  head = model.encoder.regression_head
  head.register_forward_hook(lambda m, i, o: captured.update(pred=o))
  ema_fwd = model.encoder.ema.model.forward

  def teacher(*a, **k):   # fairseq's targets are computed inline: recompute them from its layers
    out = ema_fwd(*a, **k)
    y = [torch.nn.functional.layer_norm(tl.float(), tl.shape[-1:]) for tl in out["fc_results"][-2:]]
    captured["y"] = (sum(y) / len(y)).transpose(0, 1)
    return out
  model.encoder.ema.model.forward = teacher
  src = torch.from_numpy(batch["student"].astype(np.int64))
  tgt = torch.from_numpy(batch["source"].astype(np.int64))
  loss = P.fairseq_loss(model(src, target_tokens=tgt))
  ref = P.Side(targets=captured["y"].detach().numpy(), pred=captured["pred"].detach().numpy(),
               loss=float(loss), grads=P.torch_grads(model, loss, list(state)))
  ema_err, n, fs_ema, _ = P.ema_after_one_step(model, model.encoder.ema, layout, built, st, batch, torch)
  assert n == len(fs_ema) - 1   # all but the encoder's `version` buffer
  _check("v1 text", ours, ref, ema_err, n)


# ----------------------------------------------------------------------------- v1 audio


def test_v1_audio_step_matches_fairseq(fs):
  torch = fs.torch
  model, model_cfg = M.v1_audio_model(fs)
  state = P.torch_state(model)
  cfg, layout = P.our_config(
      "configs/audio.py:variant=tiny", model_cfg, state,
      **{"data.max_samples": 1600, "data.min_samples": 1600, "data.buckets": (1600,),
         "data.span": 3, "batch_size": 2, "seed": 0, "optim.schedule": "cosine",
         "optim.warmup_steps": 0, "optim.lr": 1e-3, "optim.clip": 0.0,
         "guards.min_target_var": 0.0, "guards.min_pred_var": 0.0})
  built, st, batch, ours = P.our_run(cfg, layout, state)

  model.train()
  captured = {}
  model.final_proj.register_forward_hook(lambda m, i, o: captured.update(pred=o))
  ema_fwd = model.ema.model.extract_features

  def teacher(*a, **k):
    x, layers = ema_fwd(*a, **k)
    y = [torch.nn.functional.instance_norm(lr[2].permute(1, 2, 0).float()).transpose(1, 2)
         for lr in layers]
    captured["y"] = sum(y) / len(y)
    return x, layers
  model.ema.model.extract_features = teacher
  mask = torch.from_numpy(batch["mask"])
  loss = P.fairseq_loss(model(torch.from_numpy(batch["audio"]), mask_indices=mask))
  ref = P.Side(targets=captured["y"].detach().numpy(), pred=captured["pred"].detach().numpy(),
               loss=float(loss), grads=P.torch_grads(model, loss, list(state)))
  ema_err, n, fs_ema, _ = P.ema_after_one_step(model, model.ema, layout, built, st, batch, torch)
  assert n == len(fs_ema)
  _check("v1 audio", ours, ref, ema_err, n)


# ---------------------------------------------------------------------------- v1 vision


def test_v1_vision_step_matches_fairseq_port(fs, capsys):
  """fairseq's own port (examples/data2vec/models/data2vec_vision.py), not the data2vec_vision
  repository our 1.0 vision recipe follows: no regression head, a teacher fed the student's
  patch embeddings, LayerNorm eps 1e-5 (our config options; docs/fairseq.md)."""
  torch = fs.torch
  model, model_cfg = M.v1_vision_model(fs)
  state = P.torch_state(model)
  cfg, layout = P.our_config(
      "configs/vision.py:variant=tiny", model_cfg, state,
      **{"batch_size": 2, "seed": 0, "data.min_mask_block": 2, "data.num_mask_patches": 6,
         "optim.warmup_steps": 0, "optim.lr": 1e-3, "optim.clip": 0.0, "optim.init_lr_scale": 0.0})
  assert cfg.head.layers == 0 and cfg.teacher.share_local
  built, st, batch, ours = P.our_run(cfg, layout, state)

  model.train()
  captured = {}
  mask = torch.from_numpy(batch["mask"])
  model.make_mask = lambda bsz, *a: mask.view(bsz, 4, 4).long()
  model.encoder.register_forward_hook(lambda m, i, o: captured.update(pred=o[mask]))
  ema_fwd = model.ema.model.forward

  def teacher(*a, **k):
    out = ema_fwd(*a, **k)
    ln = lambda t: torch.nn.functional.layer_norm(t.float(), t.shape[-1:])
    captured["y"] = ln(sum(ln(t) for t in out[-2:]) / 2)
    return out
  model.ema.model.forward = teacher
  image = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2)))
  loss = P.fairseq_loss(model(image))
  capsys.readouterr()   # the port's debug prints
  ref = P.Side(targets=captured["y"].detach().numpy(), pred=captured["pred"].detach().numpy(),
               loss=float(loss), grads=P.torch_grads(model, loss, list(state)))
  assert "final_proj.weight" not in ref.grads   # created, never used by the port
  ema_err, n, fs_ema, _ = P.ema_after_one_step(model, model.ema, layout, built, st, batch, torch)
  capsys.readouterr()
  assert n == len(fs_ema) - 1   # all but the position index buffer
  with capsys.disabled():
    _check("v1 vision (fairseq port)", ours, ref, ema_err, n)


def test_v2_text_decoder_init_is_fairseqs(fs):
  """fairseq initialises its text decoder's projection with init_bert_params (N(0, 0.02), bias
  0: TextEncoder never re-initialises it, unlike the audio / image decoders) and its convs with
  torch's default; the importer's settings give our fresh init the same distributions."""
  import jax
  vocab = M.dictionary(fs, 40)
  model, model_cfg = M.v2_text_model(fs, vocab)
  state = P.torch_state(model)
  cfg, _ = P.our_config("configs/text.py:variant=tiny,v2", model_cfg, state,
                        **{"data.path": "synthetic", "data.block_size": 12})
  assert cfg.v2.decoder.proj_init == "bert"
  from d2v_jax import build as build_lib
  params = jax.device_get(build_lib.build(cfg, devices=jax.devices()[:1]).init(0).params)["decoder"]
  fs_p = dict(model.named_parameters())
  dec = "modality_encoders.TEXT.decoder"
  for ours, theirs in ((params["proj_0"]["kernel"], fs_p[f"{dec}.proj.0.weight"]),
                       (params["proj"]["kernel"], fs_p[f"{dec}.proj.2.weight"]),
                       (params["conv_0"]["kernel"], fs_p[f"{dec}.blocks.0.0.weight"])):
    ratio = float(np.std(ours)) / float(theirs.detach().std())
    assert 0.85 < ratio < 1.15, ratio     # 2k-5k draws: the std's sampling error is < 3 %
  assert not params["proj_0"]["bias"].any() and not fs_p[f"{dec}.proj.0.bias"].detach().any()
