#!/usr/bin/env bash
# CUDA check, run from the repository root on a machine with an NVIDIA GPU (at most ~11 min): the CUDA
# cases of the test suite (its `device` fixture adds "cuda"), the per-layer and end-to-end step
# benchmarks on the GPU and a profiler table of the filtered conv (reproduce/gpu_profile.py).
# Outputs go to $OUT (default benchmarks/results/gpu).
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" \
  >> "$OUT/gpu.txt" 2>&1
timeout 200 python3 -m pytest -q -p no:cacheprovider -x -k "cuda" tests/test_ops_spec.py \
  tests/test_ops_behaviour.py tests/test_lean.py tests/test_blocks.py 2>&1 | tail -25 > "$OUT/tests_cuda.txt"
echo "tests rc=${PIPESTATUS[0]}" >> "$OUT/tests_cuda.txt"
timeout 150 python3 -m gradfilter.cli bench layers --device cuda --repeats 25 \
  --out "$OUT/layers_cuda.json" > "$OUT/layers_cuda.txt" 2>&1
timeout 240 python3 -m gradfilter.cli bench step --device cuda --repeats 15 \
  --out "$OUT/step_cuda.json" > "$OUT/step_cuda.txt" 2>&1
timeout 60 python3 benchmarks/reproduce/gpu_profile.py > "$OUT/profile.txt" 2>&1
cat "$OUT"/tests_cuda.txt "$OUT"/layers_cuda.txt "$OUT"/step_cuda.txt
