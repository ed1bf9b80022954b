#!/usr/bin/env bash
# The GPU checks of issue 5, as one script for a machine with CUDA (none was lent so far; see
# docs/benchmarks.md). From the repository root: `bash benchmarks/gpu.sh [OUTDIR]` (PYTHON picks the
# interpreter). Correctness first (tests/test_gpu.py: every CUDA backend in fp32 and bf16, forward and
# gradients, against the float64 equations), then the layer in fp32 and bf16 with peak memory
# (torch.cuda.max_memory_allocated) up to N = 4096, then memory against N and its plot, then the tables.
set -euo pipefail
py=${PYTHON:-python}
out=${1:-gpu_results}
mkdir -p "$out"
"$py" -m pytest -m gpu tests/test_gpu.py -q -rs 2>&1 | tee "$out/pytest_gpu.log"
for dtype in float32 bfloat16; do
  "$py" benchmarks/bench_attention.py --device cuda --dtype "$dtype" --B 16 --N 197 1025 4096 --L 20 --memory \
    --repeats 20 --max-naive-gib 32 --out "$out/attn_$dtype.json" 2>&1 | tee "$out/attn_$dtype.log"
  "$py" benchmarks/report.py "$out/attn_$dtype.json" --memory --norga flex > "$out/tables_$dtype.md"
done
"$py" benchmarks/bench_attention.py --device cuda --B 1 --N 197 577 1025 2049 4096 --L 20 --memory --repeats 10 \
  --out "$out/mem.json" 2>&1 | tee "$out/mem.log"
"$py" benchmarks/plot_memory.py "$out/mem.json" --mode fwdbwd --out "$out/memory_gpu.png"
