#!/usr/bin/env bash
# Ninth sitting, one H200 (issues 19 and 21), one call of at most ~8 minutes: the routed GEMV of quantized experts
# (GPU tests, the w4a16 layer table, Qwen3-30B-A3B w4a16 end to end, routed), Qwen3's q/k
# norms inside the RoPE kernel (GPU tests, Qwen3-8B end to end), then synthetic Llama-3.1-8B: fp8-dynamic and w8a8
# against bf16, the FP8 KV cache's Triton paths against the bf16 cache at 2048 and 8192 tokens, and a 2048-token
# w4a16 prefill with the Triton dequantization (both switches were off by default when this ran: --triton-fp8-kv and
# --triton-prefill-dequant then; both are on now). Carry .whl (../shared/gpu/README.md, with llguidance's wheel as
# benchmarks/gpu_run8.sh says); logs and bench folders go to $OUT.
#   bash benchmarks/gpu_run9.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/raytp_out}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh
python3 -m ray.scripts.scripts start --head --port=6390 --num-gpus=1 --include-dashboard=false --disable-usage-stats >$OUT/ray_start.log 2>&1 && export RAY_ADDRESS=127.0.0.1:6390
timeout 75 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_routed_packed_gemv.py tests/gpu/test_moe_decode.py -k "routed or w4a16" >$OUT/routed_tests.log 2>&1; echo "routed tests: $(tail -1 $OUT/routed_tests.log)"; grep -E "^(FAILED|ERROR)|Error" $OUT/routed_tests.log | head -8
timeout 40 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_attention_kernels.py -k "qk_norm" >$OUT/qknorm_tests.log 2>&1; echo "qk-norm tests: $(tail -1 $OUT/qknorm_tests.log)"; grep -E "^(FAILED|ERROR)" $OUT/qknorm_tests.log | head -5
timeout 60 python3 benchmarks/moe_gemv.py --int4-only --out $OUT/moe_int4.json 2>&1 | tee $OUT/moe_int4.log | grep -v Warn
C=(--dtype bfloat16 --devices cuda:0 --allreduce-iters 10 --repeats 1)
bench moe_w4a16_routed 100 --model synthetic:qwen3-30b-a3b --quant w4a16 --batch 1,8 --prompt-len 128 --decode-tokens 64 --profile 3 "${C[@]}"
bench qwen3_8b 60 --model synthetic:qwen3-8b --batch 1 --prompt-len 128 --decode-tokens 64 --profile 3 "${C[@]}"
B8=(--model synthetic:llama-3.1-8b "${C[@]}")
bench act_quant 70 "${B8[@]}" --quant none,fp8-dynamic,w8a8 --batch 1 --prompt-len 128 --decode-tokens 64
bench kv_fp8_on 60 "${B8[@]}" --batch 1 --prompt-len 2048,8192 --decode-tokens 32 --max-context 8448 --kv-dtype fp8
bench kv_bf16 50 "${B8[@]}" --batch 1 --prompt-len 2048,8192 --decode-tokens 32 --max-context 8448
bench prefill_on 60 "${B8[@]}" --quant none,w4a16 --batch 1 --prompt-len 2048 --decode-tokens 8
grep -h "^profile" $OUT/*.log
