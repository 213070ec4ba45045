#!/usr/bin/env bash
# Regenerates the seven built-in models in assets/models/ (one per router of the routers paper
# plus the dense baseline) on the full Fashion-MNIST training set, with their model cards.
# Two runs at a time, one thread each (on 2 cores this is faster than one run on both: candle's
# element-wise ops barely scale at this model size). Needs `apt-get install dataset-fashion-mnist`.
#
#   scripts/train-models.sh [EPOCHS] [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS="${1:-3}"
SEED="${2:-0}"
JOBS="${JOBS:-2}"
OUT="${OUT:-assets/models}"
cargo build --release --locked
mkdir -p "$OUT" "$OUT/logs"
start=$(date +%s)
printf '%s\n' softmax-tc softmax-ec sinkhorn-tc sinkhorn-ec sparse-ec soft dense |
  xargs -P "$JOBS" -I{} sh -c \
    "RAYON_NUM_THREADS=1 target/release/routerscope train --router {} --epochs $EPOCHS --seed $SEED \
       --out $OUT/fashion-mnist-{}.safetensors > $OUT/logs/{}.log 2>&1 \
     && echo '{}: done' || { echo '{}: FAILED (see $OUT/logs/{}.log)'; exit 255; }"
echo "all seven trained in $(( $(date +%s) - start )) s"
rm -f "$OUT"/*.train-state.safetensors
