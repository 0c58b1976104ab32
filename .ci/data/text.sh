#!/usr/bin/env bash
# Real public-domain text: the King James Bible from Debian's bible-kjv (4.3 MB).
set -euo pipefail
out=data/text/kjv.txt
if [ ! -s "$out" ]; then
  mkdir -p data/text
  bible "Gen1:1-Rev22:21" > "$out.tmp" && mv "$out.tmp" "$out"
fi
echo "[setup] text corpus: $out ($(wc -c < "$out") bytes)"
