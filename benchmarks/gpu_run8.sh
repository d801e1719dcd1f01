#!/usr/bin/env bash
# Eighth sitting, one H200 (issue 19): the packed GEMV's launch variants, the GPU suite, then end to end.
#   bash benchmarks/gpu_run8.sh kernels   packed-GEMV GPU tests; every launch of benchmarks/quant_gemv.py's sweep at
#                                         batch 1 (int4, int4-zp, int8, fp8) and 16 (int4); Nsight Compute's view of
#                                         the int4 gate_up GEMV; the tables last
# Logs go to $OUT.
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
*) echo "usage: $0 kernels"; exit 2 ;;
esac
