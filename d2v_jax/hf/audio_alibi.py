"""data2vec 2.0 audio with ALiBi (model.alibi) -> a Hugging Face directory with remote code.

No transformers class adds ALiBi to Data2VecAudio, so the export carries
modeling_d2v_audio_alibi.py (d2v_jax/hf/remote/): Data2VecAudioModel with the bias in every
layer and the learned per-head scale at `encoder.alibi_scale`; config.json's auto_map makes
AutoModel / AutoModelForCTC load it with trust_remote_code=True. Everything else is the
ordinary audio map (d2v_jax/hf/audio.py).
"""

from __future__ import annotations

from d2v_jax.hf import audio
from d2v_jax.hf.common import Table

FAMILY = "Data2VecAudio + ALiBi (remote code)"
FAMILIES = ("data2vec-audio-alibi",)
ARCHITECTURE = "Data2VecAudioAlibiModel"
FLAX = False
ARCH = audio.ARCH
PREFIXES = audio.PREFIXES
HINT = audio.HINT
PROBE = audio.PROBE
REMOTE = ("modeling_d2v_audio_alibi.py", "data2vec-audio-alibi",
          {"AutoConfig": "Data2VecAudioAlibiConfig", "AutoModel": "Data2VecAudioAlibiModel",
           "AutoModelForCTC": "Data2VecAudioAlibiForCTC"})


def table(cfg) -> Table:
  t = audio.table(cfg)
  return Table(top=t.top + (("encoder.alibi_scale", ("embed", "alibi_scale"), "param"),),
               block=t.block, layer_prefix=t.layer_prefix)


def check_representable(cfg) -> None:
  audio.check_representable(cfg, alibi_ok=True)


def hf_config(cfg):
  return audio.hf_config(cfg, alibi_ok=True)


def complete(state: dict, cfg) -> dict:
  return audio.complete(state, cfg)


def write_extra(cfg, out_dir: str, workdir: str):
  del workdir
  audio.feature_extractor(cfg).save_pretrained(out_dir)
  return hf_config(cfg)

