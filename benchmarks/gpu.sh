#!/usr/bin/env bash
# Everything a GPU run records, in one command that ends within 10 minutes on an H200 (every step has its own time
# limit, and the limits sum to 540 s):
#
#   bash benchmarks/gpu.sh [--dry-run] [OUTDIR]          # from the repository root; PYTHON picks the interpreter
#
#   1. the self-check (python -m norga.info: every backend against the float64 reference, timed against the floor)
#   2. tests/test_gpu.py (every CUDA backend against the float64 equations, fp32 and bf16, forward and gradients,
#      and every family's patched ViT layer by layer)
#   3. the attention layer, bf16 then fp32: ViT-B heads, B = 64, L = 20, N = 197, 577, 1025, 4096, forward and
#      forward + backward, peak memory, every contender (the authors' naive algorithm, each backend, the floor)
#   4. one SMoPE layer against a per-task pool and the plain layer, and the authors' layer with SMOPE_AUTHORS
#      (merge and auto)
#   5. a patched ViT-B inference and training step against the unpatched model (merge and auto)
#
# Each step writes OUTDIR/<step>.log (and JSON where it has results); OUTDIR/steps.tsv has each step's exit status
# (124: it ran out of time) and seconds. The script exits 1 if any step failed or ran out of time.
# --dry-run runs the same steps on the CPU at tiny sizes, without flex (a FlexAttention compilation on CPU takes up
# to a minute; the suite checks flex there), fp32 tests only, and with ten times each step's time limit (the limits
# are sized for the GPU; the dry run checks the steps, not the budget): tests/test_bench_smoke.py runs it, so that
# this script cannot rot. SMOPE_AUTHORS=PATH (a checkout of the authors' SMoPE code) adds their layer to step 4.
set -uo pipefail
py=${PYTHON:-python}
dry=0
scale=1  # time limits are the GPU run's; a dry run on a CPU shared with other jobs gets ten times as long
if [[ "${1:-}" == "--dry-run" ]]; then
  dry=1
  scale=10
  shift
fi
out=${1:-gpu_results}
mkdir -p "$out"
: > "$out/steps.tsv"
failed=0

step() {  # step NAME SECONDS COMMAND...: run COMMAND with a time limit, its output in OUTDIR/NAME.log
  local name=$1 limit=$(($2 * scale))
  shift 2
  local start=$SECONDS
  timeout --kill-after=5 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$out/steps.tsv"
  echo "$name: exit $rc after $((SECONDS - start)) s (limit $limit s)"
  [[ $rc -eq 0 ]] || failed=1
}

if [[ $dry -eq 1 ]]; then
  device=cpu
  info=(--quick --repeats 1 --dtypes float32 bfloat16 --backends math merge sdpa)
  export NORGA_GPU_TEST_DEVICE=cpu
  gpu_tests=(-k "not flex and not bf16")
  attention=(--B 1 --N 9 17 --L 3 --repeats 1 --warmup 0 --memory --contenders naive merge sdpa auto floor timm)
  smope=(--B 1 --N 16 --repeats 1)
  vit=(--model vit_tiny_patch16_224 --batch 1 --train-batch 1 --layers 2 --repeats 1 --train-repeats 1 --warmup 0)
else
  device=cuda
  info=(--quick --repeats 10 --dtypes float32 bfloat16)
  gpu_tests=()
  attention=(--B 64 --N 197 577 1025 4096 --L 20 --repeats 10 --warmup 2 --max-naive-gib 32 --memory)
  smope=(--B 1 64 --repeats 20)
  vit=(--batch 64 --train-batch 64 --repeats 10 --train-repeats 5)
fi

step selfcheck 100 "$py" -m norga.info --device "$device" "${info[@]}" --json "$out/selfcheck.json"
step test_gpu 110 "$py" -m pytest -m gpu tests/test_gpu.py -q -rs -p no:cacheprovider ${gpu_tests[@]+"${gpu_tests[@]}"}
for dtype in bfloat16 float32; do
  step "attention_$dtype" 100 "$py" benchmarks/bench_attention.py --device "$device" --dtype "$dtype" \
    "${attention[@]}" --out "$out/attention_$dtype.json"
  [[ -f "$out/attention_$dtype.json" ]] && "$py" benchmarks/report.py "$out/attention_$dtype.json" --memory \
    --norga merge > "$out/tables_$dtype.md"
done
for backend in merge auto; do
  step "smope_$backend" 30 "$py" benchmarks/bench_smope.py --device "$device" --backend "$backend" "${smope[@]}" \
    ${SMOPE_AUTHORS:+--authors "$SMOPE_AUTHORS"} --out "$out/smope_$backend.json"
  step "vit_$backend" 35 "$py" benchmarks/bench_vit.py --device "$device" --backend "$backend" --no-compile \
    "${vit[@]}" --out "$out/vit_$backend.json"
done
echo "steps (name, exit status, seconds) in $out/steps.tsv"
exit $failed
