#!/usr/bin/env bash
# The reference for the step-parity tests (tests/test_fairseq_parity.py) and the fairseq
# checkpoint tests: the PyPI sdist fairseq-fixed==0.12.3.1 (fairseq 0.12 with
# examples/data2vec, v1 and v2), unpacked under .cache/fairseq/ (git-ignored). Test-only:
# the package never imports fairseq. Checked against its sha256; idempotent.
set -euo pipefail
name=fairseq_fixed-0.12.3.1
sha=c607577a54ab30e2ee0f0b0a754ea5cdbc6ad0a9f99a1726638a2201445bc1cc
url=https://files.pythonhosted.org/packages/7e/e9/df8fe7f34cfb7dbaacdb7a288813cad22491a32ea278820268ee34ac57ec/$name.tar.gz
out=.cache/fairseq
if [ -f "$out/$name/fairseq/examples/data2vec/models/data2vec2.py" ]; then
  echo "[setup] fairseq reference: $out/$name"
  exit 0
fi
mkdir -p "$out"
curl -fsSL --retry 3 -o "$out/$name.tar.gz.part" "$url"
echo "$sha  $out/$name.tar.gz.part" | sha256sum -c --quiet -
tar -xzf "$out/$name.tar.gz.part" -C "$out"
rm "$out/$name.tar.gz.part"
echo "[setup] fairseq reference: $out/$name"
