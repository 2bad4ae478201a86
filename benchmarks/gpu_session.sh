#!/usr/bin/env bash
# One device-machine call: GPU tests, kernel check + timings, engine throughput.
# Usage on the device: bash benchmarks/gpu_session.sh STEP...   (STEP: tests, tests-small, kernels, w1-1b,
# w1-8b, peers-1b, peers-8b, profile-1b, profile-8b, steps-1b, steps-8b, torch-1b, quant-b1,
# quant-tune, quant-b1-only, quant-b1-ab, quant-offload, quant-cap, int4-probe, features-tests, kernels-w1, kernels-gaps, compiles-8b, gemv, gemv-engine, gemv-chain, lone-decode, w1-fp8,
# kernels-w1-fp8, persistent-probe, gemm-probe, gemm-streamk, blas-probe,
# read-bw, sampler-probe, gemm-prefill, persistent-layers, loadtest-1b, serving-ab, variants-ab, chat-ab, engine-ab, profile-engine, profile-serving,
# overlap-probe, argmax-probe)
# Prefix BENCH_COMMIT=<the commit sent> (the device copy's .git is stale; the JSON records it).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"

service_setup() { # the service's wheels (`.whl`, carried) and a random 1B model with SmolLM2's
  # tokenizer (SmolLM2's vocabulary) for `bentoml serve`: its path in $m
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target .site .whl/*.whl
  export PYTHONPATH=$PWD/.site:$PWD
  m=$(python -c 'import shutil, sys; from pathlib import Path
sys.path.insert(0, "benchmarks"); from workloads import build_random_llama
d = build_random_llama("1b", Path("/tmp/lt_models"), "cuda", 0, vocab_size=49152)
[shutil.copy(f, d) for f in Path(".whl/tokenizer").iterdir()]; print(d)' | tail -1)
}

for step in "$@"; do
  echo "=== $step $(date -u +%H:%M:%S)"
  case $step in
    tests) python -m pytest tests/model tests/kernels tests/engine/test_offload.py \
             tests/engine/test_sampling.py tests/unit/test_quant.py \
             tests/unit/test_device_inputs.py -m gpu -q -x -p no:cacheprovider \
             2>&1 | tee "$OUT/gpu_tests.log" | tail -25
           [ "${PIPESTATUS[0]}" = 0 ] || { echo "GPU tests failed: stopping"; exit 1; } ;;
    tests-small) # the kernel tests' small cases (device fixture) on the card, not only in the
             # interpreter; they are not marked gpu, so `tests` leaves them out
             python -m pytest tests/kernels -m "not gpu" -q -p no:cacheprovider \
             2>&1 | tee "$OUT/gpu_tests_small.log" | tail -25 ;;
    profile-1b) python benchmarks/profile_engine.py --model 1b --out "$OUT/profile_1b.txt" 2>&1 | tail -40 ;;
    profile-8b) python benchmarks/profile_engine.py --model 8b --torch-profile \
             --out "$OUT/profile_8b.txt" 2>&1 | tail -45 ;;
    steps-1b|steps-8b) m=${step#steps-}; python benchmarks/profile_engine.py --model "$m" --no-profile \
             --out "$OUT/steps_$m.txt" 2>&1 | tail -8 ;;
    compiles-8b) python benchmarks/profile_engine.py --model 8b --no-profile --passes 2 \
             --log-compiles --out "$OUT/compiles_8b.txt" 2>&1 | grep -v "^per step" | tail -30 ;;
    torch-1b) python benchmarks/profile_engine.py --model 1b --torch-profile \
             --out "$OUT/torch_1b.txt" 2>&1 | tail -45 ;;
    quant-b1) python benchmarks/quant_offload.py --cases tune,b1 --out "$OUT/quant_b1.json" 2>&1 | tail -40 ;;
    quant-tune) python benchmarks/quant_offload.py --cases tune --out "$OUT/quant_tune.json" 2>&1 | grep -v "^ *$" | tail -120 ;;
    quant-b1-only) python benchmarks/quant_offload.py --cases b1 --out "$OUT/quant_b1.json" 2>&1 | tail -20 ;;
    quant-b1-ab) python benchmarks/quant_offload.py --cases b1 --pdl-ab --out "$OUT/quant_b1_ab.json" 2>&1 | tail -20 ;;
    quant-offload) python benchmarks/quant_offload.py --cases offload --out "$OUT/offload.json" 2>&1 | tail -12 ;;
    int4-probe) # each int4 path at 1-256 rows (8B shapes) against bf16
             python benchmarks/int4_probe.py --m 1,2,4,8,16,32,64,128,256 \
               --out "$OUT/int4_probe.json" 2>&1 | tail -110 ;;
    features-tests) # the newer features' GPU tests, one file a process, one at a time (each
             # engine sizes its memory: processes side by side make each other's engines
             # refuse to start), each with its own limit (compiles take minutes); logs kept
             for f in tests/model/test_gpu_moe.py tests/model/test_gpu_gemma.py \
                      tests/model/test_gpu_lora.py tests/model/test_gpu_structured_outputs.py \
                      tests/unit/test_int4.py tests/unit/test_awq.py tests/unit/test_gptq.py \
                      tests/unit/test_compressed_tensors.py tests/kernels/test_quant_int4.py \
                      tests/kernels/test_fused_moe.py tests/kernels/test_attention_window.py; do
               log="$OUT/features_$(basename "$f" .py).log"
               timeout "${FILE_LIMIT_S:-240}" python -m pytest "$f" -m "gpu or not gpu" -q -rf \
                 -p no:cacheprovider > "$log" 2>&1; echo "$f: rc=$? $(tail -1 "$log")"
             done ;;
    quant-cap) python benchmarks/quant_offload.py --cases cap --out "$OUT/offload_cap.json" 2>&1 | tail -12 ;;
    gemv) python benchmarks/gemv.py --out "$OUT/gemv.json" 2>&1 | tail -150 ;;
    gemv-chain) python benchmarks/gemv.py --cases chain --out "$OUT/gemv_chain.json" 2>&1 | tail -16 ;;
    gemv-engine) python benchmarks/gemv.py --cases engine --out "$OUT/gemv_engine.json" 2>&1 | tail -12 ;;
    overlap-probe) # power and SM clock sampled beside it (the probe's JSON marks each case's times)
             # (power.draw is a one-second average on this driver: phases of ~2 s read true)
             nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm --format=csv,noheader -lms 50 \
               > "$OUT/overlap_smi.csv" & smi=$!
             python benchmarks/overlap_probe.py --out "$OUT/overlap.json" ${OVERLAP_ARGS:-} 2>&1 | tail -40
             kill "$smi" ;;
    lone-decode) python benchmarks/lone_decode.py --out "$OUT/lone_decode.json" 2>&1 | tail -12 ;;
    kernels-gaps) python benchmarks/kernels.py --quick --gaps --out "$OUT/kernels_gaps.md" 2>&1 | tail -20 ;;
    kernels-w1) python benchmarks/kernels.py --quick --w1 --out "$OUT/kernels_w1.md" 2>&1 | tail -60 ;;
    kernels-w1-fp8) python benchmarks/kernels.py --quick --w1 --w1-fp8 --out "$OUT/kernels_w1_fp8.md" 2>&1 | tail -60 ;;
    persistent-probe) for c in "4 1024" "8 512" "2 1024" "4 512"; do set -- $c
             BN=$1 BK=$2 timeout 150 python benchmarks/persistent_probe.py 2>&1 | tail -50; done \
             | tee "$OUT/persistent_probe.txt" ;;
    blas-probe) timeout 300 python benchmarks/blas_probe.py --out "$OUT/blas_probe.json" 2>&1 | tail -150
             timeout 200 python benchmarks/blas_probe.py --m 16384 --shapes gate_up,down --out "$OUT/blas_probe_prefill.json" 2>&1 | tail -60 ;;
    argmax-probe) python benchmarks/argmax_probe.py --out "$OUT/argmax_probe.json" 2>&1 | tail -30 ;;
    sampler-probe) python benchmarks/sampler_probe.py --out "$OUT/sampler_probe.json" 2>&1 | tail -30 ;;
    read-bw) python benchmarks/read_bw_probe.py --out "$OUT/read_bw.json" 2>&1 | tail -12 ;;
    gemm-prefill) timeout 400 python benchmarks/gemm_probe.py --m 16384 --shapes gate_up \
             --kinds tma,persistent --out "$OUT/gemm_prefill.json" 2>&1 | tail -60 ;;
    gemm-streamk) timeout 420 python benchmarks/gemm_probe.py --shapes gate_up,down,qkv,o \
             --kinds persistent,streamk --out "$OUT/gemm_streamk.json" 2>&1 | tail -120 ;;
    gemm-probe) timeout 420 python benchmarks/gemm_probe.py --shapes "${GEMM_SHAPES:-gate_up,qkv}" \
             --out "$OUT/gemm_probe.json" 2>&1 | tail -80 ;;
    persistent-layers) timeout 300 python benchmarks/persistent_layers_probe.py --model 1b \
             --out "$OUT/persistent_layers_1b.json" 2>&1 | tail -30 ;;
    loadtest-1b) # the BentoML service under locust; needs `.whl` (../shared/tools/gpu-wheels.sh)
             # carried, with SmolLM2's tokenizer files in .whl/tokenizer/
             service_setup
             timeout 560 python -m loadtests.run --serve-arg model=$m --serve-arg device=cuda \
               --serve-arg dtype=bfloat16 --serve-arg max_concurrency=512 \
               --users "${LT_USERS:-1,16,64,256}" --duration "${LT_DURATION:-30}" \
               --stop-timeout 30 --max-tokens 128 --label "H200, Llama-3.2-1B shape" \
               --processes "${LT_PROCESSES:-1}" ${LT_SERVE_ARGS:-} \
               --out "$OUT/loadtest_h200_1b${AB:-}${ROUND:-}" 2>&1 | tail -12 ;;
    chat-ab) # the BentoML service (ChatUser, 256 users, 4 workers, 20 s) with each of VARIANTS
             # (space-separated KEY=VALUE[,KEY=VALUE] server settings) in turn, ${AB_ROUNDS:-2}
             # rounds; prints each run's 256-user row; needs `.whl` carried
             service_setup
             V=${VARIANTS:-"piecewise_max_tokens=0 piecewise_max_tokens=2048"}
             for r in $(seq "${AB_ROUNDS:-2}"); do for v in $V; do
               sa=(); for kv in ${v//,/ }; do sa+=(--serve-arg "$kv"); done
               d="$OUT/chat_$(echo "$v$r" | tr -c 'a-z0-9\n' _)"
               timeout 150 python -m loadtests.run --serve-arg model=$m --serve-arg device=cuda \
                 --serve-arg dtype=bfloat16 --serve-arg max_concurrency=512 --serve-arg workers=4 \
                 "${sa[@]}" --users 256 --duration 20 --stop-timeout 20 --max-tokens 128 \
                 --user-class ChatUser --processes 8 --out "$d" > /dev/null 2>&1
               echo "$v round $r: $(grep '^| 256' "$d/summary.md" 2>/dev/null || echo 'no summary')"
             done; done ;;
    variants-ab) # engine settings in turn (one engine each, ~65 s a run), sampled streams as
             # chat sends them; VARIANTS: space-separated KEY=VALUE[,KEY=VALUE] (default: piecewise
             # graphs off / on, three rounds); needs `.whl/tokenizer` carried
             V=${VARIANTS:-"piecewise_max_tokens=0 piecewise_max_tokens=2048"}
             args=(); for r in 1 2 3; do for v in $V; do args+=(--variant "$v"); done; done
             timeout 580 python benchmarks/serving_probe.py --model 1b --streams 256 --repeats 1 \
               --async-only --engine-process 1 --front-ends 4 --tokenizer .whl/tokenizer \
               --closed-loop "${AB_LOOP_S:-10}" --temperature 1 "${args[@]}" \
               --out "$OUT/variants_ab.json" 2>&1 | grep "streams:" ;;
    engine-ab) # the engine loop alone (no front ends, no HTTP; sampled requests arriving as
             # others finish): engine settings in turn, three rounds, ~30 s an engine
             V=${VARIANTS:-"piecewise_max_tokens=0 piecewise_max_tokens=2048"}
             args=(); for v in $V; do args+=(--variant "$v"); done
             timeout 580 python benchmarks/host_step_probe.py --device cuda --model 1b \
               --streams 256 --seconds "${AB_LOOP_S:-10}" --warmup 5 --temperature 1 \
               --rounds 3 "${args[@]}" 2>&1 | grep "streams" ;;
    profile-engine) # py-spy over the engine loop alone (host_step_probe.py on the card), with
             # ${VARIANT:-} as its one engine setting (e.g. piecewise_max_tokens=2048)
             python3 -m pip install -q --no-index --no-deps --target /tmp/ps .whl/extra/py_spy*.whl
             /tmp/ps/bin/py-spy record --nonblocking -r 100 -f raw -o /tmp/prof_engine.txt -- \
               python benchmarks/host_step_probe.py --device cuda --model 1b --streams 256 \
               --seconds 15 --warmup 5 --temperature 1 ${VARIANT:+--variant "$VARIANT"} \
               2>&1 | grep "streams"
             f=$(echo "${VARIANT:-default}" | tr -c 'a-z0-9\n' _)
             python benchmarks/pyspy_summary.py /tmp/prof_engine.txt > "$OUT/pyspy_engine_$f.txt" ;;
    serving-ab) # this tree vs the one in .ab/ (carried: `git archive REV vllm_runner benchmarks
             # kernels | tar -x -C .ab`), the serving probe alternating, ${AB_ROUNDS:-2} rounds
             P=${AB_PROBE_ARGS:-"--model 1b --streams 256 --repeats 1 --async-only --engine-process 1
                --front-ends 4 --tokenizer .whl/tokenizer --closed-loop ${AB_LOOP_S:-20}"}
             for r in $(seq "${AB_ROUNDS:-2}"); do
               for side in A B; do
                 if [ $side = A ]; then root=$PWD; script=benchmarks/serving_probe.py
                 else root=$PWD/.ab; script=.ab/benchmarks/serving_probe.py; fi
                 echo "$side$r: $(PYTHONPATH=$root timeout 200 python $script $P \
                   --out "$OUT/serving_ab_$side$r.json" 2>&1 | grep "streams:")"
               done
             done ;;
    profile-serving) # py-spy (its wheel carried in .whl/extra/) starts the probe: attaching is refused here
             python3 -m pip install -q --no-index --no-deps --target /tmp/ps .whl/extra/py_spy*.whl
             /tmp/ps/bin/py-spy record --subprocesses --nonblocking -r 50 -f raw -o /tmp/prof.txt -- \
               python benchmarks/serving_probe.py --model 1b --streams 256 --repeats 1 --async-only \
               --engine-process 1 --front-ends 4 --tokenizer .whl/tokenizer --closed-loop 20 \
               ${PROFILE_ARGS:-} 2>&1 | grep "streams:"
             python benchmarks/pyspy_summary.py /tmp/prof.txt > "$OUT/pyspy_summary.txt" ;;
    kernels) python benchmarks/kernels.py --check --quick --out "$OUT/kernels.md" 2>&1 | tail -40 ;;
    w1-1b) python benchmarks/throughput.py --device cuda --models 1b --systems engine \
             --out "$OUT/w1_1b_engine.json" 2>&1 | tail -25 ;;
    w1-8b) python benchmarks/throughput.py --device cuda --models 8b --systems engine \
             --out "$OUT/w1_8b_engine.json" 2>&1 | tail -25 ;;
    w1-fp8) python benchmarks/throughput.py --device cuda --models 1b,8b --systems engine \
             --kv-cache-dtype fp8 --out "$OUT/w1_engine_fp8kv.json" 2>&1 | tail -25 ;;
    peers-1b) python benchmarks/throughput.py --device cuda --models 1b --systems hf,hf_cb,engine \
             --out "$OUT/w1_1b_all.json" 2>&1 | tail -25 ;;
    peers-8b) python benchmarks/throughput.py --device cuda --models 8b --systems hf,hf_cb,engine \
             --out "$OUT/w1_8b_all.json" 2>&1 | tail -25 ;;
  esac
done
