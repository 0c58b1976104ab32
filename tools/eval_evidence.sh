#!/usr/bin/env bash
# Evidence that pretraining learns (docs/evaluation.md): short CPU
# pretraining runs on the real data of .ci/setup, then linear / k-NN probes of the pretrained
# student vs a random init of the same architecture (mean +- std over 3 stratified splits, and
# the effective rank of the probed features) on held-out data: examples the pretraining never
# saw, with labels it never saw.
#   tools/eval_evidence.sh [text] [vision] [audio] [prompts]   (default: text vision audio)
# text    held-out KJV chapters (book group, testament)
# vision  sklearn digits (pretraining: data/vision/photos)
# audio   spoken language ID, 5 languages, on prompts held out of pretraining in every
#         language (tools/probe_data.py lang; pretraining: data/eval/lang_pretrain)
# prompts the older prompt-class probe (digits / letters / phonetic / voicemail) of the English
#         prompts: NOT held out (the runlocal audio run pretrains on those same files)
# Runs go to runs/eval_<name>; rerunning resumes / re-probes (training is idempotent). Extra
# arguments for every training run: EVAL_TRAIN_ARGS="--config.optim.lr=5e-4 ...".
set -euo pipefail
todo=("${@:-text vision audio}")
todo=(${todo[*]})
extra=(${EVAL_TRAIN_ARGS:-})

# vision / audio: probe data set, default runlocal pretraining, one probe task.
image_or_audio() {  # modality probe_data_name eval_dir run_name [train args...]
  local modality=$1 data=$2 eval_dir=$3 run=runs/eval_$4
  shift 4
  python tools/probe_data.py "$data"
  python -m d2v_jax.train --config "configs/$modality.py:variant=tiny,runlocal" --workdir "$run" \
    --config.checkpoint_every=100 --config.keep_checkpoints=10 "$@" "${extra[@]}"
  python -m d2v_jax.probe --workdir "$run" --data "data/eval/$eval_dir" --baseline --repeats 3
  python tools/probe_curve.py --workdir "$run" --data "data/eval/$eval_dir"
}

for m in "${todo[@]}"; do
  case $m in
    text)
      python tools/probe_data.py text
      python -m d2v_jax.train --config configs/text.py:variant=tiny,runlocal --workdir runs/eval_text \
        --config.data.path=data/eval/kjv_pretrain.txt --config.total_steps=1200 \
        --config.teacher.anneal_steps=1200 --config.optim.warmup_steps=60 \
        --config.checkpoint_every=200 --config.keep_checkpoints=10 "${extra[@]}"
      for t in group testament; do
        python -m d2v_jax.probe --workdir runs/eval_text --data data/eval/kjv_$t.tsv --baseline --repeats 3
      done
      python tools/probe_curve.py --workdir runs/eval_text --data data/eval/kjv_group.tsv
      ;;
    vision) image_or_audio vision digits digits vision ;;
    audio) image_or_audio audio lang lang_id lang --config.data.path='data/eval/lang_pretrain/*.wav' ;;
    prompts) image_or_audio audio audio prompt_words audio ;;
    *) echo "unknown evidence $m (text, vision, audio, prompts)" >&2; exit 2 ;;
  esac
done
