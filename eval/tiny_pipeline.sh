#!/usr/bin/env bash
# The whole tiny-model evidence run on one GPU: train the model, learn 50% and 70% masks
# with `leank train`, evaluate them against baselines. Outputs under leank/data/tiny-llama/
# and eval/results/mask_quality.{json,md}; with $OUT set, logs and tarballs are copied there.
#   bash eval/tiny_pipeline.sh                     # all steps (~10 min on one H100)
#   SKIP_MODEL=1 bash eval/tiny_pipeline.sh        # reuse the committed model
#   SKIP_QUALITY=1 / SKIP_MASKS=1                  # split the run (e.g. to fit 10-minute slots)
set -uo pipefail
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd) PYTHONUNBUFFERED=1 TQDM_DISABLE=1
OUT=${OUT:-/tmp/leank-tiny-out}; mkdir -p "$OUT"
M=leank/data/tiny-llama
if [ -z "${SKIP_MODEL:-}" ]; then
  timeout 480 python eval/train_tiny_model.py --out $M --time-budget ${BUDGET:-400} \
    --eval-n ${EVAL_N:-50} 2>&1 | grep -v Warning | tee "$OUT/train_tiny.log"
  tar cf "$OUT/tiny-llama.tar" $M
fi
if [ -z "${SKIP_MASKS:-}" ]; then
  for r in 70 50; do
    timeout 90 python -m leank.cli train masks/recipes/tiny-llama.yaml --ratio 0.$r \
      --output $M/mask-k$r.safetensors --no-resume 2>&1 | tee "$OUT/mask_k$r.log"
  done
  rm -f $M/*.checkpoint.pt
  tar cf "$OUT/tiny-llama.tar" $M
fi
if [ -z "${SKIP_QUALITY:-}" ]; then
  timeout ${QUALITY_TIMEOUT:-200} python eval/mask_quality.py --model $M --mask 0.5=$M/mask-k50.safetensors \
    --mask 0.7=$M/mask-k70.safetensors --n ${QUALITY_N:-60} --batch 50 2>&1 | tee "$OUT/quality.log"
  tar cf "$OUT/results.tar" eval/results/mask_quality.json eval/results/mask_quality.md 2>/dev/null
  tail -14 "$OUT/quality.log"
fi
