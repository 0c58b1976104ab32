#!/usr/bin/env bash
# Real 16 kHz speech: Asterisk's English studio prompts (Debian asterisk-core-sounds-en-g722,
# CC-BY-SA-3.0, 568 files, ~25 min) decoded from G.722 to 16-bit mono WAV with ffmpeg
# (sox cannot read G.722). The 10 files under silence/ are left out (no speech; per-utterance
# normalisation would only amplify their noise floor). Idempotent.
set -euo pipefail
src=/usr/share/asterisk/sounds/en_US_f_Allison
out=data/audio/prompts
if [ ! -d "$src" ]; then
  echo "[setup] $src missing: apt-get install asterisk-core-sounds-en-g722" >&2
  exit 1
fi
mkdir -p "$out"
n=0
while IFS= read -r f; do
  rel=${f#"$src"/}
  name=${rel%.g722}
  dst="$out/${name//\//_}.wav"
  if [ ! -s "$dst" ]; then
    ffmpeg -nostdin -loglevel error -y -f g722 -i "$f" -ar 16000 -ac 1 -c:a pcm_s16le "$dst.tmp.wav"
    mv "$dst.tmp.wav" "$dst"
  fi
  n=$((n + 1))
done < <(find "$src" -name '*.g722' -not -path '*/silence/*' | sort)
echo "[setup] audio prompts: $out ($n wav files, $(du -sh "$out" | cut -f1))"
