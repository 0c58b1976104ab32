#!/usr/bin/env bash
# Evidence that pretraining learns (README: Evaluation): short CPU pretraining runs on the real
# data of .ci/setup, then linear / k-NN probes of the pretrained student vs a random init of
# the same architecture on labelled tasks the pretraining never saw labels for.
#   tools/eval_evidence.sh [text] [vision] [audio]      (default: all; run from the repo root)
# Runs go to runs/eval_<modality>; rerunning resumes / re-probes (training is idempotent).
set -euo pipefail
todo=("${@:-text vision audio}")
todo=(${todo[*]})

# vision / audio: probe data set, default runlocal pretraining, one probe task.
image_or_audio() {  # modality probe_data_name eval_dir
  python tools/probe_data.py "$2"
  python -m d2v_jax.train --config "configs/$1.py:variant=tiny,runlocal" --workdir "runs/eval_$1" \
    --config.checkpoint_every=100 --config.keep_checkpoints=10
  python -m d2v_jax.probe --workdir "runs/eval_$1" --data "data/eval/$3" --baseline --repeats 3
  python tools/probe_curve.py --workdir "runs/eval_$1" --data "data/eval/$3"
}

for m in "${todo[@]}"; do
  case $m in
    text)
      python tools/probe_data.py text
      python -m d2v_jax.train --config configs/text.py:variant=tiny,runlocal --workdir runs/eval_text \
        --config.data.path=data/eval/kjv_pretrain.txt --config.total_steps=1200 \
        --config.teacher.anneal_steps=1200 --config.optim.warmup_steps=60 \
        --config.checkpoint_every=200 --config.keep_checkpoints=10
      for t in group testament; do
        python -m d2v_jax.probe --workdir runs/eval_text --data data/eval/kjv_$t.tsv --baseline --repeats 3
      done
      python tools/probe_curve.py --workdir runs/eval_text --data data/eval/kjv_group.tsv
      ;;
    vision) image_or_audio vision digits digits ;;
    audio) image_or_audio audio audio prompt_words ;;
    *) echo "unknown modality $m (text, vision, audio)" >&2; exit 2 ;;
  esac
done
