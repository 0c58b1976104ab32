#!/usr/bin/env bash
# Real photos for the vision tests / runlocal config: scikit-image's bundled sample photos and
# scikit-learn's two sample images (offline, BSD / public domain / CC0 as listed in their
# packages), written as PNG to data/vision/photos. Idempotent.
set -euo pipefail
out=data/vision/photos
if [ ! -s "$out/.done" ]; then
  mkdir -p "$out"
  .venv/bin/python - "$out" <<'PY'
import os, sys
import numpy as np
from PIL import Image
import skimage.data as sk

out = sys.argv[1]
# Photographs only (no synthetic or binary images); the rest of skimage.data downloads.
names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon",
         "hubble_deep_field", "immunohistochemistry", "retina", "brick", "grass", "gravel",
         "clock", "page", "text"]
n = 0
for name in names:
  try:
    a = getattr(sk, name)()
  except Exception as e:  # a sample that needs a download: skip it
    print(f"[setup] skimage.data.{name} unavailable ({type(e).__name__})", file=sys.stderr)
    continue
  Image.fromarray(np.asarray(a, np.uint8)).save(os.path.join(out, f"skimage_{name}.png"))
  n += 1
try:
  from sklearn.datasets import load_sample_images
  for fname, a in zip(load_sample_images().filenames, load_sample_images().images):
    Image.fromarray(a).save(os.path.join(out, "sklearn_" + os.path.basename(fname)), quality=95)
    n += 1
except Exception as e:
  print(f"[setup] sklearn sample images unavailable ({type(e).__name__})", file=sys.stderr)
open(os.path.join(out, ".done"), "w").write(f"{n}\n")
PY
fi
echo "[setup] vision photos: $out ($(ls "$out" | wc -l) files)"
