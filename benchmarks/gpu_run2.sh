#!/usr/bin/env bash
# Second sitting on 4x H200: GPU tests (kernels, graphs), the 8B step profile in graph mode, all-reduce
# inside CUDA graphs (host-staged kernel vs NCCL), and the 8B/70B decode benches with the fused kernels.
#   carry .whl; bash benchmarks/gpu_run2.sh     (results in $OUT)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/raytp_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -d .whl ] && ! python3 -c "import ray" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
timeout 150 python3 -m pytest tests/gpu -q -p no:cacheprovider >"$OUT/gpu_tests.log" 2>&1; echo "gpu tests: $(tail -1 "$OUT/gpu_tests.log")"
timeout 120 python3 benchmarks/profile_step.py synthetic:llama-3.1-8b >"$OUT/profile_8b_tp1_graph.log" 2>&1; head -2 "$OUT/profile_8b_tp1_graph.log"
timeout 150 python3 benchmarks/allreduce_graph.py --ranks 2,4 --out "$OUT/allreduce_graph.json" >"$OUT/allreduce_graph.log" 2>&1; tail -17 "$OUT/allreduce_graph.log"
python3 -m ray.scripts.scripts start --head --port=6390 --num-gpus=4 --include-dashboard=false --disable-usage-stats >/dev/null 2>&1
export RAY_ADDRESS=127.0.0.1:6390
PERF=(--dtype bfloat16 --batch 1,8 --prompt-len 128 --decode-tokens 64 --repeats 3)
for spec in "b8_tp1 synthetic:llama-3.1-8b cuda*1 hoststaged" "b8_tp2_nccl synthetic:llama-3.1-8b cuda*2 nccl" \
            "b8_tp4_nccl synthetic:llama-3.1-8b cuda*4 nccl" "b8_tp4_hs synthetic:llama-3.1-8b cuda*4 hoststaged" \
            "b70_tp4_nccl synthetic:llama-3.1-70b cuda*4 nccl"; do
  set -- $spec
  timeout 100 python3 -m raytp bench --model "$2" --devices "$3" --comm "$4" "${PERF[@]}" --out "$OUT/$1.json" >>"$OUT/bench.log" 2>&1
  echo "-- $1 rc=$?"
done
python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1
python3 - "$OUT" <<'PY'
import json, sys, glob, os
for f in sorted(glob.glob(os.path.join(sys.argv[1], "b*.json"))):
    r = json.load(open(f))
    for d in r.get("decode", []):
        print(f"{os.path.basename(f)[:-5]:<14} batch {d['batch']:>2}  {d['ms_per_token']:7.2f} ms/token  "
              f"{d['tokens_per_s']:8.1f} tokens/s  {100 * d['roofline_fraction']:5.1f}% of roofline")
PY
