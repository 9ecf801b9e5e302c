#!/usr/bin/env bash
# CUDA check, run from the repository root on a machine with an NVIDIA GPU (at most ~9.5 min): the
# CUDA cases of the test suite (its `device` fixture adds "cuda"), the per-layer benchmark, the
# end-to-end step benchmark eager (energy per step from NVML where pynvml is installed) and
# compiled with CUDA graphs of the whole forward and backward (inductor, mode reduce-overhead),
# and a profiler table of the filtered conv (reproduce/gpu_profile.py).
# Outputs go to $OUT (default benchmarks/results/gpu).
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" \
  >> "$OUT/gpu.txt" 2>&1
timeout 140 python3 -m pytest -q -p no:cacheprovider -x -k "cuda" tests/test_ops_spec.py \
  tests/test_ops_behaviour.py tests/test_lean.py tests/test_blocks.py 2>&1 | tail -25 > "$OUT/tests_cuda.txt"
echo "tests rc=${PIPESTATUS[0]}" >> "$OUT/tests_cuda.txt"
timeout 90 python3 -m gradfilter.cli bench layers --device cuda --repeats 25 \
  --out "$OUT/layers_cuda.json" > "$OUT/layers_cuda.txt" 2>&1
timeout 110 python3 -m gradfilter.cli bench step --device cuda --repeats 15 \
  --out "$OUT/step_cuda.json" > "$OUT/step_cuda.txt" 2>&1
timeout 170 python3 -m gradfilter.cli bench step --device cuda --repeats 15 --compile \
  --compile-mode reduce-overhead --methods vanilla,filtered --models mobilenet_v2,resnet18 \
  --last 4 --out "$OUT/step_cuda_compiled.json" > "$OUT/step_cuda_compiled.txt" 2>&1
timeout 40 python3 benchmarks/reproduce/gpu_profile.py > "$OUT/profile.txt" 2>&1
cat "$OUT"/tests_cuda.txt "$OUT"/layers_cuda.txt "$OUT"/step_cuda.txt "$OUT"/step_cuda_compiled.txt
