#!/usr/bin/env bash
# Real 16 kHz speech in four more languages for the held-out language-ID probe
# (tools/probe_data.py lang, docs/evaluation.md): the Asterisk core prompts of Debian
# asterisk-core-sounds-{es,fr,it,ru}-g722 (es_MX Allison, the English voice; fr_CA June;
# it_IT Carlo; ru_RU IvrvoiceRU; CC-BY-SA-3.0, ~530-600 files each) decoded from G.722 to
# 16-bit mono WAV under data/audio/lang/<lang>/ with the flat names of .ci/data/audio.sh
# (sub/dir/name.g722 -> sub_dir_name.wav; English is data/audio/prompts itself).
# silence/ is left out, as in audio.sh. One ffmpeg call decodes up to 64 files (one call
# per file would spend most of the time starting ffmpeg): ~30 s for all four. Idempotent.
set -euo pipefail
root=/usr/share/asterisk/sounds
out=data/audio/lang
declare -A voice=([es]=es_MX_f_Allison [fr]=fr_CA_f_June [it]=it_IT_m_Carlo [ru]=ru_RU_f_IvrvoiceRU)

decode() {  # one ffmpeg call on pairs "src dst" (src1 dst1 src2 dst2 ...); then renames
  local args=() outs=() dsts=() i=0 d
  while [ $# -gt 0 ]; do
    args+=(-f g722 -i "$1")
    outs+=(-map "$i" -ar 16000 -ac 1 -c:a pcm_s16le "$2.tmp.wav")
    dsts+=("$2")
    i=$((i + 1))
    shift 2
  done
  ffmpeg -nostdin -loglevel error -y "${args[@]}" "${outs[@]}"
  for d in "${dsts[@]}"; do mv "$d.tmp.wav" "$d"; done
}

for lang in es fr it ru; do
  src=$root/${voice[$lang]}
  if [ ! -d "$src" ]; then
    echo "[setup] $src missing: apt-get install asterisk-core-sounds-$lang-g722" >&2
    exit 1
  fi
  dir=$out/$lang
  mkdir -p "$dir"
  todo=() n=0
  while IFS= read -r f; do
    rel=${f#"$src"/}
    name=${rel%.g722}
    dst="$dir/${name//\//_}.wav"
    n=$((n + 1))
    [ -s "$dst" ] && continue
    todo+=("$f" "$dst")
    if [ ${#todo[@]} -ge 128 ]; then decode "${todo[@]}"; todo=(); fi
  done < <(find "$src" -name '*.g722' -not -path '*/silence/*' | sort)
  if [ ${#todo[@]} -gt 0 ]; then decode "${todo[@]}"; fi
  echo "[setup] $lang prompts: $dir ($n wav files, $(du -sh "$dir" | cut -f1))"
done
