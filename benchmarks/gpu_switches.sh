#!/usr/bin/env bash
# The kernel switches, each off and on in one sitting on one H200 (issues 19 and 21), and the whole GPU suite on a
# one-GPU host (issue 19, item 6). A default is on only where "on" wins in its own table.
#   bash benchmarks/gpu_switches.sh suite    every test under tests/gpu (many host-staged ranks share the one GPU)
#   bash benchmarks/gpu_switches.sh ab       synthetic Llama-3.1-8B: the prefill dequantization on a 2048-token w4a16
#                                            prefill; the FP8 KV cache at 2048 and 8192 tokens, batch 1, against the
#                                            bf16 cache; fp8-dynamic and w8a8 against bf16 at batch 1 and 8, with
#                                            and without --weight-only-act-quant
#                                            (--routed-quantized-experts: benchmarks/gpu_moe.sh)
#   bash benchmarks/gpu_switches.sh blocks   fine-grained FP8 (Qwen's 128 x 128 block scales, never run on a GPU):
#                                            its GPU tests, then synthetic Llama-3.1-8B in fp8 against fp8-blocks and
#                                            bf16 at batch 1 and 8, and Qwen3-30B-A3B in fp8-blocks, routed
# Carry .whl (../shared/gpu/README.md, llguidance's wheel added as benchmarks/gpu_run8.sh says). Logs go to $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/raytp_out}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh
case "${1:-}" in
suite)
  timeout 540 python3 -m pytest -q -p no:cacheprovider --durations=10 tests/gpu >"$OUT/gpu_suite.log" 2>&1
  echo "gpu suite rc=$?: $(tail -1 "$OUT/gpu_suite.log")"; grep -E "^(FAILED|ERROR)" "$OUT/gpu_suite.log" | head -10
  ;;
ab)  # one call of ~8 minutes: each bench one timed repeat, batch 1 (batch 8 where the target names it)
  python3 -m ray.scripts.scripts start --head --port=6390 --num-gpus=1 --include-dashboard=false \
    --disable-usage-stats >"$OUT/ray_start.log" 2>&1 && export RAY_ADDRESS=127.0.0.1:6390
  B8=(--model synthetic:llama-3.1-8b --dtype bfloat16 --devices cuda:0 --allreduce-iters 10 --repeats 1)
  bench prefill_off 70 "${B8[@]}" --quant none,w4a16 --batch 1 --prompt-len 2048 --decode-tokens 8 --no-triton-prefill-dequant
  bench prefill_on 60 "${B8[@]}" --quant w4a16 --batch 1 --prompt-len 2048 --decode-tokens 8
  LONG=(--batch 1 --prompt-len 2048,8192 --decode-tokens 32 --max-context 8448)
  bench kv_bf16 60 "${B8[@]}" "${LONG[@]}"
  bench kv_fp8_off 60 "${B8[@]}" "${LONG[@]}" --kv-dtype fp8 --no-triton-fp8-kv
  bench kv_fp8_on 60 "${B8[@]}" "${LONG[@]}" --kv-dtype fp8
  bench act_quant 80 "${B8[@]}" --quant none,fp8-dynamic,w8a8 --batch 1,8 --prompt-len 128 --decode-tokens 64
  bench act_quant_weight_only 80 "${B8[@]}" --quant fp8-dynamic,w8a8 --batch 1,8 --prompt-len 128 --decode-tokens 64 \
    --weight-only-act-quant
  ;;
blocks)
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_packed_gemv.py -k "block or fp8" \
    >"$OUT/blocks_tests.log" 2>&1
  echo "block tests: $(tail -1 "$OUT/blocks_tests.log")"; grep -E "^(FAILED|ERROR)" "$OUT/blocks_tests.log" | head -10
  python3 -m ray.scripts.scripts start --head --port=6390 --num-gpus=1 --include-dashboard=false \
    --disable-usage-stats >"$OUT/ray_start.log" 2>&1 && export RAY_ADDRESS=127.0.0.1:6390
  B8=(--dtype bfloat16 --devices cuda:0 --allreduce-iters 10 --repeats 1 --prompt-len 128 --decode-tokens 64)
  bench fp8_blocks 120 --model synthetic:llama-3.1-8b --quant none,fp8,fp8-blocks --batch 1,8 "${B8[@]}"
  bench moe_fp8_blocks 240 --model synthetic:qwen3-30b-a3b --quant fp8-blocks --batch 1,8 \
    --routed-quantized-experts "${B8[@]}"
  ;;
*) echo "usage: $0 suite|ab|blocks"; exit 2 ;;
esac
