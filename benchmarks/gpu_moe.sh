#!/usr/bin/env bash
# Mixture of experts on one H200 (issue 21): the MoE GPU tests, then synthetic Qwen3-30B-A3B in w4a16 with
# --routed-quantized-experts and in bf16, against the dense Llama-3.1-8B
# at batch 1 and 8 (tokens/s and the roofline of the bytes each reads per token), with the step profile; the routed
# kernels' table last.
#   bash benchmarks/gpu_moe.sh   carry .whl (../shared/gpu/README.md); logs and bench folders go to $OUT
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/raytp_out}/moe; mkdir -p "$OUT"
LOGS=$OUT
source benchmarks/gpu_env.sh
python3 -m ray.scripts.scripts start --head --port=6390 --num-gpus=1 --include-dashboard=false \
  --disable-usage-stats >"$LOGS/ray_start.log" 2>&1 && export RAY_ADDRESS=127.0.0.1:6390
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_moe_gemv.py tests/gpu/test_moe_decode.py \
  tests/gpu/test_routed_packed_gemv.py >"$LOGS/gpu_tests.log" 2>&1
echo "gpu tests: $(tail -1 "$LOGS/gpu_tests.log")"
COMMON=(--dtype bfloat16 --devices cuda:0 --batch 1,8 --prompt-len 128 --decode-tokens 64 --allreduce-iters 10
        --repeats 2 --profile 3)
# loading 30B of w4a16 experts (each repacked, then stacked) took over 100 s on 2026-12-05: generous limits
bench qwen3_30b_a3b_w4a16_routed 240 --model synthetic:qwen3-30b-a3b --quant w4a16 --routed-quantized-experts \
  "${COMMON[@]}"
bench qwen3_30b_a3b 200 --model synthetic:qwen3-30b-a3b "${COMMON[@]}"
bench llama8b 120 --model synthetic:llama-3.1-8b "${COMMON[@]}"
grep "^profile" "$LOGS"/*.log
timeout 120 python3 benchmarks/moe_gemv.py --int4 --out "$LOGS/moe_gemv.json" 2>&1 | tee "$LOGS/moe_gemv.log"
