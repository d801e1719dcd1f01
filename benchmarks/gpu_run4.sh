#!/usr/bin/env bash
# Fourth sitting on 4x H200, part 1: GPU tests (the fused RoPE/cache and decode-attention kernels included),
# where a one-GPU 8B decode step spends its time with the Triton kernels on and off, the 8B sweep over 1, 2
# and 4 GPUs, and the same sweep's NCCL points with RAYTP_TRITON=0 side by side.
# Carry .whl; `bash benchmarks/gpu_run4.sh`; $OUT gets one tarball (the device returns at most 8 files).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/raytp_out}; mkdir -p "$OUT"; LOGS=/tmp/sitting4; mkdir -p $LOGS
source benchmarks/gpu_env.sh
timeout 200 python3 -m pytest tests/gpu -q -p no:cacheprovider >$LOGS/gpu_tests.log 2>&1; echo "gpu tests: $(tail -1 $LOGS/gpu_tests.log)"
grep -E "^(FAILED|ERROR)" $LOGS/gpu_tests.log | head -5
timeout 120 python3 benchmarks/profile_step.py synthetic:llama-3.1-8b >$LOGS/profile_8b.log 2>&1; sed -n 1,3p $LOGS/profile_8b.log
RAYTP_TRITON=0 timeout 120 python3 benchmarks/profile_step.py synthetic:llama-3.1-8b >$LOGS/profile_8b_torch.log 2>&1
echo "RAYTP_TRITON=0:"; sed -n 2,3p $LOGS/profile_8b_torch.log
python3 -m ray.scripts.scripts start --head --port=6390 --num-gpus=4 --include-dashboard=false --disable-usage-stats >/dev/null 2>&1
export RAY_ADDRESS=127.0.0.1:6390
timeout 200 python3 -m raytp bench --model synthetic:llama-3.1-8b --dtype bfloat16 --devices-sweep "cuda*1;cuda*2;cuda*4" \
  --comm hoststaged,nccl --batch 1,8 --prompt-len 128 --decode-tokens 48 --repeats 1 --allreduce-iters 50 \
  --out $LOGS/sweep8b >$LOGS/sweep8b.log 2>&1; echo "sweep rc=$?"
RAYTP_TRITON=0 timeout 100 python3 -m raytp bench --model synthetic:llama-3.1-8b --dtype bfloat16 --devices-sweep "cuda*1;cuda*4" \
  --comm nccl --batch 1,8 --prompt-len 128 --decode-tokens 48 --repeats 1 --allreduce-iters 50 \
  --out $LOGS/sweep8b_torch >$LOGS/sweep8b_torch.log 2>&1; echo "torch-path sweep rc=$?"
python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1
tar -C /tmp -czf "$OUT/sitting4.tgz" sitting4
for s in sweep8b sweep8b_torch; do echo "== $s"; sed -n '/^| devices/,/^$/p' $LOGS/$s/summary.md 2>/dev/null | cut -d'|' -f2,5,7,8,9,11; done
