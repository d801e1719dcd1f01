#!/usr/bin/env bash
# Seventh sitting, one H200: the tensor-core GEMV for quantized weights (issue 19), end to end after and before.
#   bash benchmarks/gpu_run7.sh   kernels' GPU tests; synthetic 8B at batch 1 and 8 in bf16, w4a16, fp8, w8a16 with
#                                 the step profile (after), bf16 and w4a16 before (the tree at 7078693, carried as
#                                 .prev: git archive 7078693 raytp | tar -x -C .prev); the kernel table last
# Carry .whl (../shared/gpu/README.md) and .prev; logs and bench folders go to $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/raytp_out}; mkdir -p "$OUT"
LOGS=$OUT/sitting7; mkdir -p "$LOGS"
source benchmarks/gpu_env.sh
python3 -m ray.scripts.scripts start --head --port=6390 --num-gpus=1 --include-dashboard=false \
  --disable-usage-stats >"$LOGS/ray_start.log" 2>&1 && export RAY_ADDRESS=127.0.0.1:6390
bench() { local name=$1 limit=$2; shift 2  # each folder comes back as one tarball (few files)
  timeout "$limit" python3 -m raytp bench "$@" --out "$LOGS/$name" >"$LOGS/$name.log" 2>&1
  echo "$name rc=$?"; grep -E "Traceback|Error" "$LOGS/$name.log" | head -3
  sed -n '/^| devices/,/^$/p' "$LOGS/$name/summary.md" 2>/dev/null | cut -d'|' -f2-12 | head -12
  tar -czf "$LOGS/$name.tgz" -C "$LOGS" "$name" && rm -r "${LOGS:?}/$name"
}
B8=(--model synthetic:llama-3.1-8b --dtype bfloat16 --devices cuda:0 --batch 1,8 --prompt-len 128 --decode-tokens 64
    --allreduce-iters 10)
timeout 60 python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_packed_gemv.py >"$LOGS/gpu_tests.log" 2>&1
echo "gpu tests: $(tail -1 "$LOGS/gpu_tests.log")"
bench after8b 260 "${B8[@]}" --quant none,w4a16,fp8,w8a16 --repeats 2 --profile 3
(cd .prev && export PYTHONPATH=/tmp/site:$PWD && bench before8b 110 "${B8[@]}" --quant none,w4a16 --repeats 1)
timeout 60 python3 benchmarks/quant_gemv.py --rows 1,8,16 --formats bf16,int4,int4-zp,int8,fp8,torch-int4 \
  --out "$LOGS/quant_gemv.json" >"$LOGS/quant_gemv.log" 2>&1
sed -n '/one rank: one decoder layer/,$p' "$LOGS/quant_gemv.log"
grep "^profile" "$LOGS/after8b.log"
