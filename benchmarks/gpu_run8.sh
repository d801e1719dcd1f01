#!/usr/bin/env bash
# Eighth sitting, one H200 (issue 19): the packed GEMV's launch variants, the GPU suite, then end to end.
#   bash benchmarks/gpu_run8.sh kernels   packed-GEMV GPU tests; every launch of benchmarks/quant_gemv.py's sweep at
#                                         batch 1 (int4, int4-zp, int8, fp8) and 16 (int4); Nsight Compute's view of
#                                         the int4 gate_up GEMV; the tables last
#   bash benchmarks/gpu_run8.sh e2e       the packed GEMV's GPU tests; synthetic Llama-3.1-8B end to end, bf16 and
#                                         w4a16, fp8, w8a16 at batch 1 and 8 with the step profile; the tree at
#                                         bf7c793 (before) at batch 1; a 2048-token prompt; 70B w4a16 on the one GPU
# Carry .whl (../shared/gpu/README.md; the GPU hosts lack llguidance: add its cp312 manylinux wheel with
# `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d .whl
# llguidance`). Logs go to $OUT.
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
e2e)  # the weight formats end to end (carry .whl with llguidance's wheel added, and .prev: git archive bf7c793 | tar -x)
  python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_packed_gemv.py >"$OUT/gemv_tests.log" 2>&1
  echo "gemv tests rc=$?: $(tail -1 "$OUT/gemv_tests.log")"
  python3 -m ray.scripts.scripts start --head --port=6390 --num-gpus=1 --include-dashboard=false \
    --disable-usage-stats >"$OUT/ray_start.log" 2>&1 && export RAY_ADDRESS=127.0.0.1:6390
  B8=(--model synthetic:llama-3.1-8b --dtype bfloat16 --devices cuda:0 --allreduce-iters 10)
  bench quant8b 200 "${B8[@]}" --batch 1,8 --prompt-len 128 --decode-tokens 64 --repeats 2 --profile 3 \
    --quant none,w4a16,fp8,w8a16
  (cd .prev && export PYTHONPATH=/tmp/site:$PWD && bench before8b 60 "${B8[@]}" --batch 1 --prompt-len 128 \
    --decode-tokens 64 --repeats 1 --quant none,w4a16)
  bench prefill8b 60 "${B8[@]}" --batch 1 --prompt-len 2048 --decode-tokens 8 --repeats 1 --quant none,w4a16
  bench w4a16_70b 70 --model synthetic:llama-3.1-70b@w4a16 --dtype bfloat16 --devices cuda:0 --batch 1 \
    --prompt-len 128 --decode-tokens 32 --repeats 1 --allreduce-iters 10
  grep -h "^profile" "$OUT"/*.log | head -20
  ;;
*) echo "usage: $0 kernels|e2e"; exit 2 ;;
esac
