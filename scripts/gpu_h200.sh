#!/usr/bin/env bash
# The GPU runs behind docs/decoding.md and the GPU tests, as stages run on the lent H200:
#
#   bash scripts/gpu_h200.sh decode8l tests serve8l           # results and logs under $OUT
#   bash scripts/gpu_h200.sh synth full                      # then: serve-full smoke-full breakdown-full
#   CADRE_SRC=.ab/base AB_BASE_COMMIT=<sha> bash scripts/gpu_h200.sh synth full24-ab   # a change, A/B, alternated
#
# A session's 30 device minutes hold three calls, each sent the moment the last returns (the
# machine stays warm 30 s; a cold one starts in ~35 s and loses /tmp). `tests synth full` in one call took
# 573 s at df05b21 (tests 151 s, store 42 s, the full table ~360 s): the most one call holds. Times seen 2026-11-30:
#   1. tests decode8l kernels8l                 ~ 450 s (slice built in ~15 s; the 106 GPU tests ~120 s;
#                                               the 110 of 7c13b09 took over 200 s on a cold machine)
#   2. synth full                               ~ 350 s (store 36 s; references first, 200 s at most)
#   3. smoke-full breakdown-full                ~ 130 s (serve-full did not finish within 110 s, twice: startup
#                                               22 s, captures, then 3 levels of up to 25 s at ~7 tok/s; it now has
#                                               300 s: give it a call of its own, after synth)
# At e2e27f4 (2026-11-30, fourth lease): `tests breakdown8l serve8l` 403 s on a cold machine (the 117
# GPU tests 200 s; serve8l with --requests-per-client 8, both budgets, ~150 s); `tests decode8l` 504 s.
# End each command with `cd $OUT && tar czf /tmp/r.tgz * && rm -rf $OUT/* && mv /tmp/r.tgz $OUT/`:
# $OUT returns at most 8 files.
#
# The machine has python3 with torch 2.11 and transformers 5.17; cadre is tested on 5.24, carried
# in .whl/base/ (bash scripts/pack_gpu_wheels.sh: its files as a 3.8 MB .tar.xz, not the 13.5 MB
# wheel; carry [".whl/base"], or [".whl"] for ray2gpu) and put first on PYTHONPATH; the transformers reference rows run in child processes on the machine's own 5.17
# (stock, as a user of that machine has it; each row names its version). Stages share /tmp/bw
# (the 8-layer slice) and /tmp/s48 (the full-depth synthetic store), so run them on one warm
# machine; the disk (64 GiB) holds one of the two, so the full-depth stages delete /tmp/bw.
# CADRE_COMMIT names the commit measured (the machine receives a copy of the working tree).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# .whl also carries the server's packages the image lacks (fastapi, uvicorn, pydantic, outlines-core)
unpack() {  # a .tar.xz into a directory, with Python's own lzma (the image need not have xz)
  python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' "$1" "$2"
}
BASE=$([ -d .whl/base ] && echo .whl/base || echo .whl)  # scripts/pack_gpu_wheels.sh's, or wheels as they were
if [ ! -d /tmp/site/transformers ]; then
  mkdir -p /tmp/site
  for packed in "$BASE"/*.tar.xz; do [ -f "$packed" ] && unpack "$packed" /tmp/site; done
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$BASE"/*.whl 2>&1 | grep -v WARNING
fi
export PYTHONPATH=/tmp/site
STOCK=(--isolate --reference-pythonpath "")
FULL=/tmp/s48
quiet() { grep -v "Loading\|Writing\|^W1\|^  File\|^    \|UserWarning\|warnings.warn\|_warn_once"; }
MODEL=(--model qwen3-30b-a3b-8l --device cuda --workdir /tmp/bw)

for stage in "$@"; do
  case "$stage" in
    tests)  # every GPU test: the captured decode path, the runtime, families, host tier
      timeout "${TESTS_TIMEOUT:-280}" python3 -m pytest -m gpu -p no:cacheprovider --durations=10 \
        $(grep -l "mark.gpu" tests/*.py) 2>&1 \
        | tee "$OUT/pytest_gpu.log" | tail -15 ;;
    tests-quick)  # only the tests of what changed last (the compiled step, the exclusive host tier)
      timeout 90 python3 -m pytest -m gpu -q -p no:cacheprovider -k "compiled_step or exclusive" \
        tests/test_decoder_gpu.py tests/test_host_tier_gpu.py 2>&1 | tee "$OUT/pytest_gpu_quick.log" | tail -5 ;;
    decode8l)  # batch 1: references (eager, compiled two ways), cadre graphs +- prefetch, gathered and grouped experts
      timeout 360 python3 -m bench decode "${MODEL[@]}" "${STOCK[@]}" --budgets 1.0,0.25 --prefetch 0,1 --cadre-compile-step \
        --gather-rows 0 \
        --impls batched_mm --compile --compile-modes gpt-fast --compile-impls batched_mm,grouped_mm \
        --tokens 64 --repeats 3 --json "$OUT/decode_h200_8l_b1.json" 2>&1 | tee "$OUT/decode_h200_8l_b1.log" \
        | quiet | tail -14 ;;
    decode8l-b16)  # batch 16: cadre 100% (+ compiled step) / 25% beside transformers' compiled batch (~200 s);
      # B16_ARGS adds options (e.g. "--eviction layer-lru": at batch 16 plain LRU cycles, bench cache-host)
      timeout 260 python3 -m bench decode "${MODEL[@]}" "${STOCK[@]}" --batch 16 --budgets 1.0,0.25 --cadre-compile-step ${B16_ARGS:-} \
        --impls batched_mm --compile --compile-modes gpt-fast --compile-impls batched_mm,grouped_mm --tokens 32 --repeats 2 \
        --json "$OUT/decode_h200_8l_b16.json" 2>&1 | tee "$OUT/decode_h200_8l_b16.log" | quiet | tail -8 ;;
    kernels8l)  # what one token launches: cadre's compiled step beside transformers' (gpt-fast), 100%
      timeout 200 python3 -m bench kernels --model qwen3-30b-a3b-8l --workdir /tmp/bw --tokens 16 \
        --json "$OUT/kernels_h200_8l.json" 2>&1 | tee "$OUT/kernels_h200_8l.log" | quiet | tail -20 ;;
    breakdown8l)  # per-token compute / copies / GPU idle at 25%, graphs and eager (120 s: it builds the slice on a cold machine)
      timeout 120 python3 -m bench breakdown --model qwen3-30b-a3b-8l --workdir /tmp/bw --budget 0.25 \
        --json "$OUT/breakdown_h200_8l.json" 2>&1 | tee "$OUT/breakdown_h200_8l.log" | quiet | tail -4 ;;
    synth)  # the full-depth Qwen3-30B-A3B store (48 layers, 61 GB; 46 if the disk is short)
      rm -rf /tmp/bw
      if [ ! -f $FULL/manifest.json ]; then
        rm -rf $FULL; free=$(df --output=avail -B1G /tmp | tail -1); layers=$([ "$free" -ge 63 ] && echo 48 || echo 46)
        echo "disk free ${free} GiB: $layers layers"
        timeout 200 python3 -m bench synth-store --config qwen3-30b-a3b --out $FULL --layers $layers --device cuda \
          2>&1 | tee "$OUT/synth_store.log" | tail -3
      fi ;;
    full)  # full depth, batch 1: transformers resident (eager, compiled; first, 200 s at most) vs cadre under caps
      timeout 420 python3 -m bench decode --store $FULL --device cuda "${STOCK[@]}" --sequential --reference-timeout 200 \
        --impls batched_mm --compile --compile-modes gpt-fast --compile-impls batched_mm --budgets "" --cadre-compile-step \
        --gpu-memory 24GiB,16GiB --host-memory 32GiB --tokens 32 --repeats 2 --json "$OUT/decode_h200_full.json" 2>&1 \
        | tee "$OUT/decode_h200_full.log" | quiet | tail -12 ;;
    full24)  # the 24 GiB row alone (~90 s), run from CADRE_SRC (default: this tree): an A/B of two versions
      # in one call, e.g. `git archive next/miss-path | tar -x -C .ab/next` here, carry .ab, CADRE_SRC=.ab/next;
      # FULL24_ARGS adds bench decode options (e.g. "--prefetch 0,1": a row each, ~60 s more)
      src=${CADRE_SRC:-.}; tag=$(basename "$(cd "$src" && pwd)")
      (cd "$src" && timeout 240 python3 -m bench decode --store $FULL --device cuda --sequential --impls "" --budgets "" \
        --gpu-memory 24GiB --host-memory 32GiB --tokens 32 --repeats 2 ${FULL24_ARGS:-} \
        --json "$OUT/decode_h200_full24_$tag.json" 2>&1 \
        | tee "$OUT/decode_h200_full24_$tag.log" | quiet | tail -5) ;;
    full24-ab)  # the 24 GiB row from CADRE_SRC (the code before, its commit in AB_BASE_COMMIT) and from this
      # tree, alternated AB_ROUNDS times (default 2; ~50 s a run): runs of one code spread as widely as a
      # 10% change (docs/memory-plan.md, parallel reads), so only alternation shows one. FULL24_ARGS applies
      # to both; results decode_h200_full24_ab_{base,main}_N
      : "${CADRE_SRC:?full24-ab needs CADRE_SRC, the code before}"
      for i in $(seq 1 "${AB_ROUNDS:-2}"); do
        CADRE_COMMIT=${AB_BASE_COMMIT:-unknown} bash "$0" full24
        for f in "$OUT"/decode_h200_full24_"$(basename "$CADRE_SRC")".*; do mv "$f" "$OUT/decode_h200_full24_ab_base_$i.${f##*.}"; done
        CADRE_SRC=. bash "$0" full24
        for f in "$OUT"/decode_h200_full24_"$(basename "$PWD")".*; do mv "$f" "$OUT/decode_h200_full24_ab_main_$i.${f##*.}"; done
      done ;;
    spy-full24)  # the 24 GiB row, without and with prefetch, sampled by py-spy (carry .whl/prof): where the
      # host's time per MoE layer goes, every thread, waits included (collapsed stacks: python -m bench spy-report spy_full24.txt);
      # SPY_ARGS replaces "--prefetch 0,1" (e.g. "--prefetch 1 --prefetch-tiers host": the store reads off the path);
      # SPY_FLAGS replaces py-spy's "--idle" (e.g. "--gil": only the samples of the thread holding the GIL)
      [ -x /tmp/spy/bin/py-spy ] || python3 -m pip install -q --no-index --no-deps --target /tmp/spy .whl/prof/*.whl
      timeout 240 /tmp/spy/bin/py-spy record ${SPY_FLAGS:---idle} --threads --nonblocking --subprocesses -r 200 -f raw \
        -o "$OUT/spy_full24.txt" -- python3 -m bench decode --store $FULL --device cuda --sequential --impls "" \
        --budgets "" --gpu-memory 24GiB --host-memory 32GiB --tokens 32 --repeats 2 ${SPY_ARGS:---prefetch 0,1} \
        --json "$OUT/decode_h200_full24_spy.json" 2>&1 | tee "$OUT/decode_h200_full24_spy.log" | quiet | tail -8 ;;
    full16)  # the 16 GiB row, without and with store reads into the host tier ahead of need (~100 s)
      timeout 200 python3 -m bench decode --store $FULL --device cuda --sequential --impls "" --budgets "" \
        --gpu-memory 16GiB --host-memory 32GiB --tokens 32 --repeats 2 --prefetch 0,1 --prefetch-tiers host \
        --json "$OUT/decode_h200_full16.json" 2>&1 | tee "$OUT/decode_h200_full16.log" | quiet | tail -8 ;;
    full24-host64)  # 24 GiB GPU beside a host tier that holds the whole store: no write-backs, no disk after warm-up
      timeout 200 python3 -m bench decode --store $FULL --device cuda --sequential --impls "" --budgets "" \
        --gpu-memory 24GiB --host-memory 64GiB --tokens 32 --repeats 2 ${FULL24_ARGS:-} \
        --json "$OUT/decode_h200_full24_host64.json" 2>&1 | tee "$OUT/decode_h200_full24_host64.log" | quiet | tail -6 ;;
    mixed-gpu)  # issue 16: the demo's shapes trained from scratch on mixed text on the GPU, then bench affinity-bound
      # (carry .cache/demo/sdist); the checkpoint comes back in 15 MB pieces (cat mixed_gpu.tgz.* | tar xz)
      timeout 300 python3 -m bench mixed-demo --out /tmp/mx --from-scratch --device cuda --steps "${MIXED_STEPS:-3000}" \
        --batch "${MIXED_BATCH:-24}" --lr 2e-3 --json "$OUT/mixed_scratch_h200.json" 2>&1 | tee "$OUT/mixed_scratch_h200.log" \
        | grep -v "^step" | tail -3 | cut -c1-400
      timeout 60 python3 -m extractor --model /tmp/mx --out /tmp/mx-store --experts all --layers all >/dev/null 2>&1
      timeout 240 python3 -m bench affinity-bound --store /tmp/mx-store --json "$OUT/affinity_bound_h200_mixed_scratch.json" \
        2>&1 | tee "$OUT/affinity_bound_h200_mixed_scratch.log" | quiet | tail -6
      tar czf /tmp/mx.tgz -C /tmp mx && split -b 15M /tmp/mx.tgz "$OUT/mixed_gpu.tgz." ;;
    full-loaders)  # the 24 GiB row with one loader thread, then eight: what parallel store reads buy
      for workers in 1 8; do
        timeout 150 python3 -m bench decode --store $FULL --device cuda --sequential --impls "" --budgets "" \
          --gpu-memory 24GiB --host-memory 32GiB --load-workers $workers --tokens 32 --repeats 2 \
          --json "$OUT/decode_h200_full_loaders_$workers.json" 2>&1 | tee "$OUT/decode_h200_full_loaders_$workers.log" \
          | quiet | tail -4
      done ;;
    full-accelerate)  # transformers + accelerate offload at 24 GiB beside cadre at 24 GiB (the model built in RAM)
      timeout 400 python3 -m bench decode --store $FULL --device cuda --sequential --impls "" --budgets "" \
        --gpu-memory 24GiB --host-memory 32GiB --accelerate --tokens 16 --repeats 1 \
        --json "$OUT/decode_h200_full_accelerate.json" 2>&1 | tee "$OUT/decode_h200_full_accelerate.log" | quiet | tail -4 ;;
    fp8-full)  # the full-depth store with FP8 experts (Qwen3-30B-A3B-FP8's format): cadre at 24 and 16 GiB
      rm -rf $FULL /tmp/bw  # the disk holds one full-depth store
      [ -f /tmp/s48f8/manifest.json ] || timeout 200 python3 -m bench synth-store --config qwen3-30b-a3b \
        --out /tmp/s48f8 --expert-format fp8 --device cuda 2>&1 | tee "$OUT/synth_store_fp8.log" | tail -2
      timeout 300 python3 -m bench decode --store /tmp/s48f8 --device cuda --sequential --impls "" --budgets "" \
        --gpu-memory 24GiB,16GiB --host-memory 32GiB --tokens 32 --repeats 2 --json "$OUT/decode_h200_full_fp8.json" \
        2>&1 | tee "$OUT/decode_h200_full_fp8.log" | quiet | tail -8 ;;
    breakdown-fp8)  # fp8-full's store at 24 GiB: GPU idle per MoE layer and the host's time by function
      rm -rf $FULL /tmp/bw
      [ -f /tmp/s48f8/manifest.json ] || timeout 200 python3 -m bench synth-store --config qwen3-30b-a3b \
        --out /tmp/s48f8 --expert-format fp8 --device cuda 2>&1 | tee "$OUT/synth_store_fp8.log" | tail -2
      timeout 150 python3 -m bench breakdown --store /tmp/s48f8 --gpu-memory 24GiB --host-memory 32GiB --no-eager \
        --decode-only --host-profile 30 --tokens 16 --json "$OUT/breakdown_h200_full_fp8.json" 2>&1 \
        | tee "$OUT/breakdown_h200_full_fp8.log" | quiet | tail -3 ;;
    serve-full)  # the server on the full-depth store at 24 GiB GPU / 32 GiB host, 1/4/16 streaming clients
      # (each level, the warm-up too, cut at 50 s: at 580eacb the 16-client level outran the stage)
      timeout 300 python3 -m bench serve --store $FULL --device cuda --dtype bfloat16 --gpu-memory 24GiB \
        --host-memory 32GiB --clients 1,4,16 --requests 16 --duration 25 --level-timeout 50 --max-tokens 32 --rounds 1 \
        --json "$OUT/serve_h200_full.json" 2>&1 | tee "$OUT/serve_h200_full.log" | quiet | tail -10 ;;
    smoke-full)  # python -m server --store --gpu-memory 24GiB: /generate with trace, a chat request, the plan
      timeout 75 bash scripts/smoke_full_depth.sh $FULL 2>&1 | tee "$OUT/smoke_full.log" | tail -12 ;;
    breakdown-full)  # per decode step (the prefill left out): compute / copies / GPU idle per MoE layer, full depth, 24 GiB
      timeout 150 python3 -m bench breakdown --store $FULL --gpu-memory 24GiB --host-memory 32GiB --no-eager --decode-only \
        --host-profile 25 --tokens 16 --json "$OUT/breakdown_h200_full.json" 2>&1 | tee "$OUT/breakdown_h200_full.log" | quiet | tail -3 ;;
    breakdown-full-prefetch)  # the same with speculative prefetch of the next MoE layer: where its host time goes
      timeout 150 python3 -m bench breakdown --store $FULL --gpu-memory 24GiB --host-memory 32GiB --no-eager --decode-only \
        --host-profile 30 --tokens 16 --prefetch 1 --json "$OUT/breakdown_h200_full_prefetch.json" 2>&1 \
        | tee "$OUT/breakdown_h200_full_prefetch.log" | quiet | tail -3 ;;
    serve-demo)  # the server's decoder engine (CUDA graphs) on the demo model: real routing, 25% and 100%
      for fraction in 0.25 1.0; do
        timeout 150 python3 -m bench serve --device cuda --dtype bfloat16 --cache-fraction "$fraction" \
          --clients 1,4,16 --requests 48 --max-tokens 64 --rounds 1 --no-reference \
          --json "$OUT/serve_h200_demo_${fraction}.json" 2>&1 | tee "$OUT/serve_h200_demo_${fraction}.log" | quiet | tail -8
      done ;;
    serve8l)  # the server's decoder engine at 25% and 100% of experts, 1/4/16 streaming clients; from CADRE_SRC
      # (default: this tree) for an A/B of two versions in one call, as full24 (needs /tmp/bw: run after decode8l)
      src=${CADRE_SRC:-.}; tag=$([ -n "${CADRE_SRC:-}" ] && echo "_$(basename "$src")")
      for fraction in 0.25 1.0; do
        (cd "$src" && timeout 100 python3 -m bench serve --store /tmp/bw/store --device cuda --dtype bfloat16 \
          --cache-fraction "$fraction" --clients 1,4,16 --requests-per-client 8 --duration 15 --max-tokens 64 --rounds 1 \
          --no-reference \
          --json "$OUT/serve_h200_8l_${fraction}${tag}.json" 2>&1 | tee "$OUT/serve_h200_8l_${fraction}${tag}.log" | quiet | tail -8)
      done ;;
    profile-serve8l)  # where the server's threads spend a level: 1 client at 25%, 16 clients at 100% (~100 s)
      for level in "0.25 1" "1.0 16"; do
        read -r fraction clients <<< "$level"
        timeout 75 python3 -m bench serve --store /tmp/bw/store --device cuda --dtype bfloat16 --cache-fraction "$fraction" \
          --clients "$clients" --requests 64 --duration 15 --level-timeout 30 --max-tokens 64 --rounds 1 --no-reference \
          --profile "$clients" --profile-seconds 8 --json "$OUT/profile_serve_h200_8l_${fraction}_${clients}.json" 2>&1 \
          | tee "$OUT/profile_serve_h200_8l_${fraction}_${clients}.log" | quiet | tail -30
      done ;;
    ray2gpu)  # nvidia-h200-x2 only: Ray Serve, one replica per H200 against one, 16 clients, the slice (docs/ray.md)
      [ -d /tmp/site/ray ] || { unpack .whl/ray/ray-2.60.0-slim.tar.xz /tmp/site && python3 -m pip install -q \
        --no-index --no-deps --no-compile --target /tmp/site .whl/ray/*.whl 2>&1 | grep -v WARNING; }
      PYTHONPATH=/tmp/site:$PWD RAY_USAGE_STATS_ENABLED=0 timeout 540 python3 -m bench ray_scaling \
        --model qwen3-30b-a3b-8l --device cuda --replicas 2 --gpus-per-replica 1 --cpus-per-replica 4 --clients 16 \
        --requests 128 --warmup 32 --max-tokens 32 --routers affinity,power-of-two --workdir /tmp/cadre-bench \
        --json "$OUT/ray_scaling_h200x2.json" 2>&1 | tee "$OUT/ray_scaling_h200x2.log" | quiet | tail -12 ;;
    fp8)  # FP8 vs bf16 experts at 25%: tok/s, loads and bytes per token (issue 13)
      timeout 300 python3 -m bench decode "${MODEL[@]}" --budgets 0.25 --expert-formats bf16,fp8 --impls grouped_mm \
        --tokens 64 --repeats 3 --json "$OUT/decode_h200_8l_fp8.json" 2>&1 | tee "$OUT/decode_h200_8l_fp8.log" \
        | quiet | tail -8 ;;
    *) echo "unknown stage $stage (tests tests-quick decode8l decode8l-b16 breakdown8l serve-demo serve8l profile-serve8l ray2gpu fp8 synth full" \
         "full24 full24-ab spy-full24 full16 full24-host64 mixed-gpu full-loaders full-accelerate fp8-full breakdown-fp8 serve-full smoke-full breakdown-full breakdown-full-prefetch)" >&2; exit 2 ;;
  esac
done
