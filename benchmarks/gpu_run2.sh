#!/usr/bin/env bash
# Second sitting on 4x H200 (after CUDA graphs, the GPU host-staged kernel and the fused kernels):
# GPU tests, all-reduce inside CUDA graphs (host-staged kernel vs NCCL), the 8B scaling sweep at 1 and 4 GPUs.
# Carry .whl; `bash benchmarks/gpu_run2.sh`; everything lands in $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/raytp_out}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh
timeout 60 python3 -m pytest tests/gpu -q -p no:cacheprovider >"$OUT/gpu_tests.log" 2>&1; echo "gpu tests: $(tail -1 "$OUT/gpu_tests.log")"
timeout 40 python3 benchmarks/allreduce_graph.py --ranks 4 --sizes 8192,131072 --iters 100 \
  --out "$OUT/allreduce_graph.json" >"$OUT/allreduce_graph.log" 2>&1; tail -5 "$OUT/allreduce_graph.log"
python3 -m ray.scripts.scripts start --head --port=6390 --num-gpus=4 --include-dashboard=false --disable-usage-stats >/dev/null 2>&1
export RAY_ADDRESS=127.0.0.1:6390
timeout 115 python3 -m raytp bench --model synthetic:llama-3.1-8b --dtype bfloat16 --devices-sweep "cuda*1;cuda*4" \
  --comm hoststaged,nccl --batch 1,8 --prompt-len 128 --decode-tokens 48 --repeats 1 --allreduce-iters 50 \
  --out /tmp/sweep8b >"$OUT/sweep8b.log" 2>&1; echo "sweep rc=$?"
python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1
tar -C /tmp -czf "$OUT/sweep8b.tgz" sweep8b 2>/dev/null; cat /tmp/sweep8b/summary.md 2>/dev/null | head -40
