#!/usr/bin/env bash
# The GPU runs behind docs/decoding.md and the GPU tests, as stages run on the lent H200:
#
#   bash scripts/gpu_h200.sh tests decode8l serve8l fp8     # results and logs under $OUT
#
# The machine has python3 with torch 2.11 and transformers 5.17; cadre is tested on 5.24, carried
# as a wheel in .whl/ (pip download transformers==5.24.0 --no-deps -d .whl). Stages share
# /tmp/bw (the 8-layer Qwen3-30B-A3B slice and its store), so run them on one warm machine.
# CADRE_COMMIT names the commit measured (the machine receives a copy of the working tree).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps .whl/transformers-*.whl 2>&1 | grep -v WARNING
quiet() { grep -v "Loading\|Writing\|^W1\|^  File\|^    \|UserWarning\|warnings.warn\|_warn_once"; }
MODEL=(--model qwen3-30b-a3b-8l --device cuda --workdir /tmp/bw)

for stage in "$@"; do
  case "$stage" in
    tests)  # every GPU test: the captured decode path, the runtime, families, host tier
      timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15 ;;
    decode8l)  # batch 1: references (eager, gpt-fast compiled), cadre graphs +- prefetch, compiled leaves
      timeout 420 python3 -m bench decode "${MODEL[@]}" --budgets 1.0,0.25 --prefetch 0,1 --cadre-compile \
        --impls batched_mm --compile --compile-modes gpt-fast --compile-impls batched_mm --tokens 64 --repeats 3 \
        --json "$OUT/decode_h200_8l_b1_ref.json" 2>&1 | tee "$OUT/decode_h200_8l_b1_ref.log" | quiet | tail -16 ;;
    serve-demo)  # the server's decoder engine (CUDA graphs) on the demo model: real routing, 25% and 100%
      for fraction in 0.25 1.0; do
        timeout 150 python3 -m bench serve --device cuda --dtype bfloat16 --cache-fraction "$fraction" \
          --clients 1,4,16 --requests 48 --max-tokens 64 --rounds 1 --no-reference \
          --json "$OUT/serve_h200_demo_${fraction}.json" 2>&1 | tee "$OUT/serve_h200_demo_${fraction}.log" | quiet | tail -8
      done ;;
    serve8l)  # the server's decoder engine at 25% and 100% of experts, 1/4/16 streaming clients
      for fraction in 0.25 1.0; do
        timeout 240 python3 -m bench serve --model /tmp/bw/qwen3-30b-a3b-8l --device cuda --dtype bfloat16 \
          --cache-fraction "$fraction" --clients 1,4,16 --requests 32 --max-tokens 64 --rounds 1 --no-reference \
          --json "$OUT/serve_h200_8l_${fraction}.json" 2>&1 | tee "$OUT/serve_h200_8l_${fraction}.log" | quiet | tail -8
      done ;;
    fp8)  # FP8 vs bf16 experts at 25%: tok/s, loads and bytes per token (issue 13)
      timeout 300 python3 -m bench decode "${MODEL[@]}" --budgets 0.25 --expert-formats bf16,fp8 --impls grouped_mm \
        --tokens 64 --repeats 3 --json "$OUT/decode_h200_8l_fp8.json" 2>&1 | tee "$OUT/decode_h200_8l_fp8.log" \
        | quiet | tail -8 ;;
    *) echo "unknown stage $stage (tests, decode8l, serve-demo, serve8l, fp8)" >&2; exit 2 ;;
  esac
done
