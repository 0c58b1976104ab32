"""A fourth modality defined only under tests/ (issue 16: adding a modality is a handful of
files, no edit in d2v_jax/): multichannel 1-D sensor signals, e.g. a 3-axis accelerometer.

  model.py   the embedder: a window of W samples x C channels -> W / patch tokens (each patch
             of patch x C samples projected to the model width), a learned mask token for the
             student, learned positions
  data.py    recordings as .npy files [samples, C] cut into windows, exact-count random token
             masks per row, a folder per class of .npy windows as the probe set
  config.py  get_config() on d2v_jax/recipe.base_config, modality = "sensor_modality"

Run as `--config tests/sensor_modality/config.py` with tests/ on PYTHONPATH (pytest puts it
there); tests/test_fourth_modality.py trains, resumes, probes and AOT-compiles it through the
public entry points.
"""
