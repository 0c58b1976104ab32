#!/usr/bin/env bash
# data2vec 1.0 vs 2.0 on the same tiny encoder and the same CPU wall-clock budget
# (docs/evaluation.md, "v1 vs v2"; issue #19): for each modality, the v1 evidence run of
# tools/eval_evidence.sh, then a v2 run on the same data and encoder that checkpoints often,
# then tools/probe_curve.py on both, then tools/v1_vs_v2.py picks the v2 checkpoints by
# elapsed training time (metrics.jsonl elapsed_s: 1/3 of v1's and all of v1's), trains a
# third run, v2 whose whole schedule fits in that third (runs/vs_<modality>_v2short: the
# step count of the last v2 checkpoint within W/3, warm-up and teacher anneal scaled to it),
# and prints the table.
#   tools/v1_vs_v2.sh [vision] [text] [audio]     (default: all three)
# Runs go to runs/vs_<modality>_v1 and runs/vs_<modality>_v2. Run it on an otherwise idle
# machine: the comparison is wall time.
set -euo pipefail
todo=("${@:-vision text audio}")
todo=(${todo[*]})

pair() {  # modality probe_data v1_steps v2_steps v2_ckpt_every [train args for both...]
  local m=$1 data=$2 s1=$3 s2=$4 every=$5
  shift 5
  python -m d2v_jax.train --config "configs/$m.py:variant=tiny,runlocal" --workdir "runs/vs_${m}_v1" \
    --config.total_steps="$s1" --config.checkpoint_every="$s1" "$@"
  python -m d2v_jax.train --config "configs/$m.py:variant=tiny,runlocal,v2" --workdir "runs/vs_${m}_v2" \
    --config.total_steps="$s2" --config.checkpoint_every="$every" --config.keep_checkpoints=50 "$@"
  local s3 runs=(v1 v2) short=()
  # No v2 checkpoint within W/3 (v2 slower per step than v1 at this size): no W/3 run.
  if s3=$(python tools/v1_vs_v2.py "runs/vs_${m}_v1" "runs/vs_${m}_v2" --third-steps); then
    # The flags after "$@" win: the W/3 run's own schedule, not a third of the long one.
    python -m d2v_jax.train --config "configs/$m.py:variant=tiny,runlocal,v2" --workdir "runs/vs_${m}_v2short" \
      "$@" --config.total_steps="$s3" --config.checkpoint_every="$s3" \
      ${WARMUP:+--config.optim.warmup_steps=$(( s3 / 10 > 0 ? s3 / 10 : 1 ))} \
      ${ANNEAL:+--config.teacher.anneal_steps=$s3}
    runs+=(v2short) short=(--short "runs/vs_${m}_v2short")
  fi
  for v in "${runs[@]}"; do
    python tools/probe_curve.py --workdir "runs/vs_${m}_$v" --data "$data"
  done
  python tools/v1_vs_v2.py "runs/vs_${m}_v1" "runs/vs_${m}_v2" "$data" "${short[@]}"
}

for m in "${todo[@]}"; do
  case $m in
    vision) python tools/probe_data.py digits
            WARMUP=1 pair vision data/eval/digits 300 300 20 ;;
    text)   python tools/probe_data.py text
            WARMUP=1 ANNEAL=1 pair text data/eval/kjv_group.tsv 1200 1200 100 --config.data.path=data/eval/kjv_pretrain.txt \
              --config.teacher.anneal_steps=1200 --config.optim.warmup_steps=60 ;;
    audio)  python tools/probe_data.py lang
            pair audio data/eval/lang_id 300 300 30 --config.data.path='data/eval/lang_pretrain/*.wav' ;;
    *) echo "unknown modality $m (vision, text, audio)" >&2; exit 2 ;;
  esac
done
