#!/usr/bin/env bash
# docs/federated.md's results: pretrained EfficientNet-Lite0 on sklearn digits, 10 clients with a
# Dirichlet(0.5) non-IID split, 10 FedAvg rounds of 1 local epoch, vanilla vs filtered r=4 on
# the last 4 blocks at 128 px; plus the centralized run (gradfilter finetune, 10 epochs: the same
# number of samples seen) for reference. ~15-20 min on a shared 2-core CPU.
# Usage, from the repository root: bash benchmarks/reproduce/federated_digits.sh [RUNS_DIR]
# (default runs/federated_digits); results go to benchmarks/results/federated_digits.
set -euo pipefail
GF=${GF:-.venv/bin/gradfilter}
RUNS=${1:-runs/federated_digits}
RESULTS=benchmarks/results/federated_digits
COMMON=(--model tf_efficientnet_lite0 --pretrained --data digits --image-size 128
        --train-last 4 --lr 1e-3 --batch-size 32 --seed 0 --quiet)
for method in vanilla filtered; do
  $GF federated "${COMMON[@]}" --method "$method" --radius 4 --clients 10 --rounds 10 \
      --partition dirichlet:0.5 --local-epochs 1 --strategy fedavg --out "$RUNS/fed_$method"
  $GF finetune "${COMMON[@]}" --method "$method" --radius 4 --epochs 10 \
      --out "$RUNS/central_$method"
done
mkdir -p "$RESULTS"
$GF compare "$RUNS"/fed_vanilla "$RUNS"/fed_filtered "$RUNS"/central_vanilla \
    "$RUNS"/central_filtered --out "$RESULTS/compare.png"
for run in fed_vanilla fed_filtered central_vanilla central_filtered; do
  cp "$RUNS/$run/metrics.json" "$RESULTS/$run.json"
done
.venv/bin/python benchmarks/reproduce/federated_table.py "$RESULTS"  # docs/federated.md's tables
