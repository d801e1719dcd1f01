#!/usr/bin/env bash
# Eighth sitting, one H200 (issue 19): the packed GEMV's launch variants, the GPU suite, then end to end.
#   bash benchmarks/gpu_run8.sh kernels   packed-GEMV GPU tests; every launch of benchmarks/quant_gemv.py's sweep at
#                                         batch 1 (int4, int4-zp, int8, fp8) and 16 (int4); Nsight Compute's view of
#                                         the int4 gate_up GEMV; the tables last
#   bash benchmarks/gpu_run8.sh check     the whole GPU suite (one GPU: the host-staged cases with 8-16 ranks on it
#                                         included); the sweep again at batch 1, the shipped launches at 1, 8, 16
#   bash benchmarks/gpu_run8.sh e2e       synthetic Llama-3.1-8B end to end: every weight format at batch 1 and 8
#                                         with the step profile, a 2048-token prefill, the FP8 KV cache at 2048 and
#                                         8192 tokens, 70B w4a16 on the one GPU; then the tree at bf7c793 (carried
#                                         as .prev: git archive bf7c793 | tar -x -C .prev) for before
# Carry .whl (../shared/gpu/README.md) for e2e. Logs go to $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/raytp_out}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh
python3 -c "import torch, triton; print(torch.cuda.get_device_name(0), torch.__version__, triton.__version__)"
case "${1:-}" in
kernels)
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_packed_gemv.py >"$OUT/gemv_tests.log" 2>&1
  echo "gemv tests: $(tail -1 "$OUT/gemv_tests.log")"; grep -E "^(FAILED|ERROR)" "$OUT/gemv_tests.log" | head -5
  timeout 300 python3 benchmarks/quant_gemv.py --rows 1,8,16 --formats bf16,int4,int4-zp,int8,fp8,torch-int4 \
    --sweep int4,int4-zp,int8,fp8 --sweep-rows 1 --out "$OUT/sweep1.json" >"$OUT/sweep1.log" 2>&1
  echo "sweep1 rc=$?"
  timeout 60 ncu --clock-control none --kernel-name regex:packed_gemv --launch-skip 3 --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
    python3 - >"$OUT/ncu.log" 2>&1 <<'PY'
import torch
from raytp.kernels import packed_gemv as pg
q = torch.randint(0, 1 << 31, (28672, 4096 // 8), dtype=torch.int32, device="cuda")
s = torch.rand(28672, 32, dtype=torch.bfloat16, device="cuda") * 1e-3
w = pg.pack_int(q, s, None, bits=4, group_size=128)
x = torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda")
for _ in range(5):
    pg.mma_linear(x, w)
torch.cuda.synchronize()
PY
  echo "ncu rc=$?"
  timeout 120 python3 benchmarks/quant_gemv.py --rows 16 --formats bf16,int4 --sweep int4 --sweep-rows 16 \
    --out "$OUT/sweep16.json" >"$OUT/sweep16.log" 2>&1
  echo "sweep16 rc=$?"
  grep -E "Memory Throughput|DRAM Throughput|Achieved Occupancy|Registers Per|Theoretical Occupancy|Duration|Warp Cycles Per Issued|Stall|Block Limit" "$OUT/ncu.log" | head -30
  sed -n '/^| format | rows | layer us/,/^$/p' "$OUT/sweep1.log" "$OUT/sweep16.log"
  sed -n '/one rank: one decoder layer/,$p' "$OUT/sweep1.log"
  ;;
check)
  timeout 330 python3 -m pytest -q -p no:cacheprovider tests/gpu >"$OUT/gpu_suite.log" 2>&1
  echo "gpu suite: $(tail -1 "$OUT/gpu_suite.log")"; grep -E "^(FAILED|ERROR)" "$OUT/gpu_suite.log" | head -20
  timeout 200 python3 benchmarks/quant_gemv.py --rows 1,8,16 --formats bf16,int4,int4-zp,int8,fp8,torch-int4 \
    --sweep int4,int4-zp,int8,fp8 --sweep-rows 1 --out "$OUT/sweep.json" >"$OUT/sweep.log" 2>&1
  echo "sweep rc=$?"
  sed -n '/^| format | rows | layer us/,/^$/p' "$OUT/sweep.log"
  sed -n '/one rank: one decoder layer/,$p' "$OUT/sweep.log"
  ;;
e2e)
  python3 -m ray.scripts.scripts start --head --port=6390 --num-gpus=1 --include-dashboard=false \
    --disable-usage-stats >"$OUT/ray_start.log" 2>&1 && export RAY_ADDRESS=127.0.0.1:6390
  bench() { local name=$1 limit=$2; shift 2  # each folder comes back as one tarball
    timeout "$limit" python3 -m raytp bench "$@" --out "$OUT/$name" >"$OUT/$name.log" 2>&1
    echo "$name rc=$?"; grep -E "Traceback|Error" "$OUT/$name.log" | head -3
    sed -n '/^| devices/,/^$/p' "$OUT/$name/summary.md" 2>/dev/null | cut -d'|' -f2-12 | head -14
    tar -czf "$OUT/$name.tgz" -C "$OUT" "$name" && rm -r "${OUT:?}/$name"
  }
  B8=(--model synthetic:llama-3.1-8b --dtype bfloat16 --devices cuda:0 --allreduce-iters 10)
  bench quant8b 230 "${B8[@]}" --batch 1,8 --prompt-len 128 --decode-tokens 64 --repeats 2 --profile 3 \
    --quant none,w4a16,fp8,w8a16,fp8-dynamic,w8a8
  bench prefill8b 60 "${B8[@]}" --batch 1 --prompt-len 2048 --decode-tokens 8 --repeats 1 --quant none,w4a16,fp8
  bench kv_bf16 60 "${B8[@]}" --batch 1,8 --prompt-len 2048,8192 --decode-tokens 32 --repeats 1 --max-context 8320
  bench kv_fp8 60 "${B8[@]}" --batch 1,8 --prompt-len 2048,8192 --decode-tokens 32 --repeats 1 --max-context 8320 \
    --kv-dtype fp8 --triton-fp8-kv
  (cd .prev && export PYTHONPATH=/tmp/site:$PWD && bench before8b 80 "${B8[@]}" --batch 1,8 --prompt-len 128 \
    --decode-tokens 64 --repeats 1 --quant none,w4a16,fp8)
  bench w4a16_70b 100 --model synthetic:llama-3.1-70b@w4a16 --dtype bfloat16 --devices cuda:0 --batch 1 \
    --prompt-len 128 --decode-tokens 32 --repeats 1 --allreduce-iters 10
  grep -h "^profile" "$OUT"/*.log | head -20
  ;;
*) echo "usage: $0 kernels|check|e2e"; exit 2 ;;
esac
