#!/usr/bin/env bash
# Third sitting on 4x H200: GPU tests, the vectorized host-staged kernel against the previous one inside CUDA
# graphs, where a one-GPU decode step spends its time, and the 8B sweep over 1, 2 and 4 GPUs with every
# backend (auto included). Carry .whl (and .prev: `mkdir .prev && git archive 57b99ee raytp | tar -x -C .prev`
# to time the previous kernel side by side); `bash benchmarks/gpu_run3.sh`; everything lands in $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/raytp_out}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh
timeout 90 python3 -m pytest tests/gpu -q -p no:cacheprovider >"$OUT/gpu_tests.log" 2>&1; echo "gpu tests: $(tail -1 "$OUT/gpu_tests.log")"
for ranks in 2 4; do
  timeout 60 python3 benchmarks/allreduce_graph.py --ranks $ranks --sizes 4096,8192,65536,1048576 --iters 100 \
    --out "$OUT/allreduce_graph_r$ranks.json" >"$OUT/allreduce_graph_r$ranks.log" 2>&1; tail -9 "$OUT/allreduce_graph_r$ranks.log"
  if [ -d .prev ]; then
    PYTHONPATH=$PWD/.prev:/tmp/site timeout 60 python3 benchmarks/allreduce_graph.py --ranks $ranks --sizes 4096,8192,65536,1048576 \
      --iters 100 --out "$OUT/allreduce_graph_prev_r$ranks.json" >"$OUT/allreduce_graph_prev_r$ranks.log" 2>&1
    echo "previous kernel:"; tail -9 "$OUT/allreduce_graph_prev_r$ranks.log" | grep hoststaged
  fi
done
timeout 150 python3 benchmarks/profile_step.py synthetic:llama-3.1-8b >"$OUT/profile_8b.log" 2>&1; head -4 "$OUT/profile_8b.log"
python3 -m ray.scripts.scripts start --head --port=6390 --num-gpus=4 --include-dashboard=false --disable-usage-stats >/dev/null 2>&1
export RAY_ADDRESS=127.0.0.1:6390
timeout 240 python3 -m raytp bench --model synthetic:llama-3.1-8b --dtype bfloat16 --devices-sweep "cuda*1;cuda*2;cuda*4" \
  --comm hoststaged,nccl,auto --batch 1,8 --prompt-len 128 --decode-tokens 48 --repeats 1 --allreduce-iters 50 \
  --out /tmp/sweep8b >"$OUT/sweep8b.log" 2>&1; echo "sweep rc=$?"
python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1
tar -C /tmp -czf "$OUT/sweep8b.tgz" sweep8b 2>/dev/null
grep -h "all-reduce backend" "$OUT/sweep8b.log" | sort | uniq -c
sed -n '/^| devices/,/^$/p' /tmp/sweep8b/summary.md 2>/dev/null | cut -d'|' -f2,5,7,8,9,11
