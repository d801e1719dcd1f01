#!/usr/bin/env bash
# Mixture of experts on one H200 (issue 21), two calls of under 10 minutes:
#   bash benchmarks/gpu_moe.sh bf16    the MoE GPU tests; synthetic Qwen3-30B-A3B in bf16 (prompts of 128 and 2048
#                                      tokens), against the dense Llama-3.1-8B, at batch 1 and 8 with the step profile
#   bash benchmarks/gpu_moe.sh w4a16   Qwen3-30B-A3B in w4a16; the routed kernels' table last
#   bash benchmarks/gpu_moe.sh kernels one layer's routed kernels at 1, 8 and 16 tokens with --sweep (the tiles of
#                                      the expert-grid kernels), then int4
# Tokens/s against the roofline of the bytes each reads per token. Carry .whl (../shared/gpu/README.md); logs and
# bench folders go to $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/raytp_out}/moe; mkdir -p "$OUT"
LOGS=$OUT
source benchmarks/gpu_env.sh
python3 -m ray.scripts.scripts start --head --port=6390 --num-gpus=1 --include-dashboard=false \
  --disable-usage-stats >"$LOGS/ray_start.log" 2>&1 && export RAY_ADDRESS=127.0.0.1:6390
COMMON=(--dtype bfloat16 --devices cuda:0 --batch 1,8 --decode-tokens 64 --allreduce-iters 10 --repeats 2
        --profile 3)
case "${1:-}" in
bf16)
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_moe_gemv.py tests/gpu/test_moe_decode.py \
    tests/gpu/test_moe_routing.py tests/gpu/test_routed_packed_gemv.py >"$LOGS/gpu_tests.log" 2>&1
  echo "gpu tests: $(tail -1 "$LOGS/gpu_tests.log")"; grep -E "^(FAILED|ERROR)" "$LOGS/gpu_tests.log" | head -10
  bench qwen3_30b_a3b 140 --model synthetic:qwen3-30b-a3b --prompt-len 128,2048 --max-context 2176 "${COMMON[@]}"
  bench llama8b 100 --model synthetic:llama-3.1-8b --prompt-len 128,2048 --max-context 2176 "${COMMON[@]}"
  ;;
w4a16)
  # loading 30B of w4a16 experts (each repacked, then stacked) took over 100 s on 2026-12-05: generous limits
  bench qwen3_30b_a3b_w4a16_routed 240 --model synthetic:qwen3-30b-a3b --quant w4a16 --prompt-len 128 \
    "${COMMON[@]}"
  timeout 100 python3 benchmarks/moe_gemv.py --int4 --out "$LOGS/moe_gemv.json" 2>&1 | tee "$LOGS/moe_gemv.log"
  ;;
kernels)
  timeout 400 python3 benchmarks/moe_gemv.py --tokens 1,8,16 --sweep --out "$LOGS/moe_gemv_sweep.json" 2>&1 \
    | tee "$LOGS/moe_gemv_sweep.log"
  timeout 150 python3 benchmarks/moe_gemv.py --int4-only --out "$LOGS/moe_gemv_int4.json" 2>&1 \
    | tee "$LOGS/moe_gemv_int4.log"
  ;;
*) echo "usage: $0 bf16|w4a16|kernels"; exit 2 ;;
esac
grep "^profile" "$LOGS"/*.log
