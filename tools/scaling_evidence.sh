#!/usr/bin/env bash
# Batch-size scaling evidence (docs/evaluation.md, "Batch-size scaling"): the tiny text and
# vision recipes of tools/eval_evidence.sh at their batch B and at 4B for the same number of
# examples, with the scaling rule (lr x sqrt(4), tau -> tau^4), without it (the recipe's lr and
# tau per step), and with one half of it (text: EMA only, lr only; vision: the linear lr rule),
# then held-out probes of each (3 splits, vs the random init); tools/scaling_summary.py prints
# the table of docs/evaluation.md (loss over examples seen, probes).
#   tools/scaling_evidence.sh [text] [vision]      runs go to runs/scale_<modality>_<case>
# Lengths are given explicitly at 4B (1/4 of the steps, warm-up, anneal and checkpoint
# interval), so the two 4B runs differ only in lr and EMA decay.
set -euo pipefail
todo=("${@:-text vision}")
todo=(${todo[*]})

run() {  # modality run_name probe_args... -- train args...
  local modality=$1 name=$2
  shift 2
  local probes=()
  while [ "$1" != "--" ]; do probes+=("$1"); shift; done
  shift
  python -m d2v_jax.train --config "configs/$modality.py:variant=tiny,runlocal" \
    --workdir "runs/scale_$name" --config.keep_checkpoints=10 "$@"
  for p in "${probes[@]}"; do
    python -m d2v_jax.probe --workdir "runs/scale_$name" --data "$p" --baseline --repeats 3
  done
}

for m in "${todo[@]}"; do
  case $m in
    text)
      python tools/probe_data.py text
      data=(--config.data.path=data/eval/kjv_pretrain.txt)
      probes=(data/eval/kjv_group.tsv data/eval/kjv_testament.tsv --)
      # B = 16 (the runlocal recipe), 1200 steps: tools/eval_evidence.sh text
      run text text_B "${probes[@]}" "${data[@]}" --config.total_steps=1200 \
        --config.teacher.anneal_steps=1200 --config.optim.warmup_steps=60 --config.checkpoint_every=200
      short=(--config.batch_size=64 --config.total_steps=300 --config.teacher.anneal_steps=300
             --config.optim.warmup_steps=15 --config.checkpoint_every=50)
      run text text_4B_scaled "${probes[@]}" "${data[@]}" "${short[@]}"
      run text text_4B_unscaled "${probes[@]}" "${data[@]}" "${short[@]}" \
        --config.scaling.lr=none --config.scaling.ema=False
      # which half of the rule does what: the EMA rule alone, the lr rule alone
      run text text_4B_ema_only "${probes[@]}" "${data[@]}" "${short[@]}" --config.scaling.lr=none
      run text text_4B_lr_only "${probes[@]}" "${data[@]}" "${short[@]}" --config.scaling.ema=False
      ;;
    vision)
      python tools/probe_data.py digits
      probes=(data/eval/digits --)
      # B = 16 (the runlocal recipe), 300 steps
      run vision vision_B "${probes[@]}" --config.checkpoint_every=100
      short=(--config.batch_size=64 --config.total_steps=75 --config.teacher.anneal_steps=75
             --config.optim.warmup_steps=8 --config.checkpoint_every=25)
      run vision vision_4B_scaled "${probes[@]}" "${short[@]}"
      run vision vision_4B_unscaled "${probes[@]}" "${short[@]}" \
        --config.scaling.lr=none --config.scaling.ema=False
      run vision vision_4B_linear "${probes[@]}" "${short[@]}" --config.scaling.lr=linear
      ;;
    *) echo "unknown modality $m (text, vision)" >&2; exit 2 ;;
  esac
  python tools/scaling_summary.py runs/scale_${m}_*
done
