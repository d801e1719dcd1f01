#!/usr/bin/env bash
# Tenth sitting, one H200 (issues 19 and 21), one call of at most ~9 minutes: what the session of 2026-12-05 (#2)
# wrote without a GPU. First its GPU tests (--fused-moe's routing, combining and one-token GEMVs,
# --grouped-mm-experts' prefill, fine-grained FP8's block scales in the packed GEMV, the routed GEMV's prefill sorted
# by expert), then synthetic Qwen3-30B-A3B in bf16 without and with --fused-moe --grouped-mm-experts (decode at
# batch 1 and 8 with the step profile, prefill of 128 and 2048 tokens),
# Llama-3.1-8B in fp8 against fp8-blocks, and the one-token GEMVs' tiles. The next calls:
#   bash benchmarks/gpu_moe.sh w4a16     Qwen3-30B-A3B w4a16 with --routed-quantized-experts (decode and, now,
#                                        prefill sorted by expert), with and without --fused-moe (never measured end
#                                        to end)
#   bash benchmarks/gpu_switches.sh suite | ab
# Carry .whl (../shared/gpu/README.md); logs and bench folders go to $OUT.
#   bash benchmarks/gpu_run10.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/raytp_out}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_moe_routing.py tests/gpu/test_moe_gemv.py \
  tests/gpu/test_moe_decode.py tests/gpu/test_packed_gemv.py tests/gpu/test_routed_packed_gemv.py \
  -k "routing or one_token or grouped or fused or block or sorted" >"$OUT/new_tests.log" 2>&1
echo "new GPU tests: $(tail -1 "$OUT/new_tests.log")"; grep -E "^(FAILED|ERROR)" "$OUT/new_tests.log" | head -10
python3 -m ray.scripts.scripts start --head --port=6390 --num-gpus=1 --include-dashboard=false \
  --disable-usage-stats >"$OUT/ray_start.log" 2>&1 && export RAY_ADDRESS=127.0.0.1:6390
C=(--dtype bfloat16 --devices cuda:0 --allreduce-iters 10 --repeats 1 --decode-tokens 64)
MOE=(--model synthetic:qwen3-30b-a3b --batch 1,8 --prompt-len 128,2048 --max-context 2176 --profile 3 "${C[@]}")
bench moe_bf16 120 "${MOE[@]}"
bench fp8_blocks 90 --model synthetic:llama-3.1-8b --quant none,fp8,fp8-blocks --batch 1 --prompt-len 128 "${C[@]}"
grep -h "^profile" "$OUT"/*.log
