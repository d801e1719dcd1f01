#!/usr/bin/env bash
# One sitting on a GPU host (see ../../shared/gpu/README.md): correctness of synthetic:tiny over splits and
# backends, then `raytp bench` of synthetic Llama 3.1 8B/70B. Everything in one call; full logs under $OUT,
# a short table printed last. Steps that would overrun BUDGET_S are skipped (and said so), never cut mid-way.
#
#   GPU host:  carry .whl; bash benchmarks/gpu_run.sh
#   CPU check: KIND=cpu bash benchmarks/gpu_run.sh      (same steps on cpu ranks, tiny model, gloo for nccl)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/raytp_out}; mkdir -p "$OUT"
RES=/tmp/raytp_results; rm -rf "$RES"; mkdir -p "$RES"
LOG=$OUT/gpu_run.log
KIND=${KIND:-cuda}
BUDGET_S=${BUDGET_S:-560}
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled RAY_DEDUP_LOGS=0
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

if [ -d .whl ] && ! python3 -c "import ray" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD

{ echo "== host"; date -u; nvidia-smi --query-gpu=index,name,memory.total,memory.used --format=csv 2>&1 | head -9
  python3 -c "import torch, ray; print('torch', torch.__version__, 'cuda', torch.cuda.device_count(), 'ray', ray.__version__)"
} >>"$LOG" 2>&1
python3 -c "import raytp.cli, raytp.actors.group, raytp.bench.sweep" >>"$LOG" 2>&1 || { tail -5 "$LOG"; exit 1; }

if [ "$KIND" = cuda ]; then
  NCCL=nccl; BIG=synthetic:llama-3.1-8b; HUGE=synthetic:llama-3.1-70b; DT=bfloat16
  UNEVEN="cuda:0@20GiB,cuda:1@60GiB,cuda:2@40GiB,cuda:3@100GiB"; MANY="cuda*12@8GiB"
  # one Ray cluster for every step: each step joins it instead of starting its own
  python3 -m ray.scripts.scripts start --head --port=6390 --num-gpus="$(nvidia-smi -L | wc -l)" \
    --include-dashboard=false --disable-usage-stats >>"$LOG" 2>&1 && export RAY_ADDRESS=127.0.0.1:6390
else
  NCCL=gloo; BIG=synthetic:tiny; HUGE=synthetic:tiny; DT=float32
  UNEVEN="cpu@1GiB,cpu@3GiB,cpu@2GiB,cpu@4GiB"; MANY="cpu*12@1GiB"
fi
D() { if [ "$KIND" = cuda ]; then echo "cuda*$1"; else echo "cpu*$1"; fi; }

START=$SECONDS
# step NAME EST_SECONDS raytp-bench-args... : runs `raytp bench ... --out $RES/NAME.json` unless time is short
step() {
  local name=$1 est=$2; shift 2
  local left=$((BUDGET_S - (SECONDS - START)))
  if [ "$est" -gt "$left" ]; then echo "SKIPPED $name (needs ~${est}s, ${left}s left)" | tee -a "$LOG" "$RES/skipped.txt"; return; fi
  echo "== $name: raytp bench $*" >>"$LOG"
  local t0=$SECONDS
  timeout $((left - 5)) python3 -m raytp bench "$@" --out "$RES/$name.json" >>"$LOG" 2>&1
  local rc=$?
  echo "-- $name rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
  [ $rc -eq 0 ] || echo "$name rc=$rc" >>"$RES/failed.txt"
}
TINY=(--model synthetic:tiny --dtype float32 --batch 1,4 --prompt-len 16 --decode-tokens 32 --repeats 1
      --allreduce-sizes 512,8192 --allreduce-iters 20)
PERF=(--dtype "$DT" --batch 1,8 --prompt-len 128 --decode-tokens 64 --repeats 3)

# (a) correctness, most telling first. With RAYTP_CHECK_IDENTICAL every all-reduce is checked bit-identical
# across ranks (that check syncs, so those steps decode eagerly); the *_graph steps decode in CUDA graphs.
export RAYTP_CHECK_IDENTICAL=1
step tiny_tp1             25 "${TINY[@]}" --devices "$(D 1)" --comm hoststaged
step tiny_tp4_hs          25 "${TINY[@]}" --devices "$(D 4)" --comm hoststaged
step tiny_uneven_nccl     25 "${TINY[@]}" --devices "$UNEVEN" --comm $NCCL
unset RAYTP_CHECK_IDENTICAL
step tiny_tp4_hs_graph    25 "${TINY[@]}" --devices "$(D 4)" --comm hoststaged
step tiny_tp3_nccl_graph  25 "${TINY[@]}" --devices "$(D 3)" --comm $NCCL
step tiny_uneven_hs_graph 25 "${TINY[@]}" --devices "$UNEVEN" --comm hoststaged
# (b) speed: 8B over 1, 2, 4 GPUs, host-staged (the GPU kernel) and NCCL, decode in CUDA graphs
step b8_tp1               50 --model $BIG "${PERF[@]}" --devices "$(D 1)" --comm hoststaged
step b8_tp2_hs            50 --model $BIG "${PERF[@]}" --devices "$(D 2)" --comm hoststaged
step b8_tp4_hs            50 --model $BIG "${PERF[@]}" --devices "$(D 4)" --comm hoststaged
step b8_tp4_nccl          50 --model $BIG "${PERF[@]}" --devices "$(D 4)" --comm $NCCL
step b8_tp2_nccl          50 --model $BIG "${PERF[@]}" --devices "$(D 2)" --comm $NCCL
# (c) more than 8 ranks: 12 on 4 GPUs, then 70B over 4
export RAYTP_CHECK_IDENTICAL=1
step tiny_tp12_hs         60 "${TINY[@]}" --devices "$MANY" --comm hoststaged --batch 1
unset RAYTP_CHECK_IDENTICAL
step b70_tp4_hs           80 --model $HUGE "${PERF[@]}" --devices "$(D 4)" --comm hoststaged
step b70_tp4_nccl         80 --model $HUGE "${PERF[@]}" --devices "$(D 4)" --comm $NCCL

[ -n "${RAY_ADDRESS:-}" ] && python3 -m ray.scripts.scripts stop --force >>"$LOG" 2>&1
# worker-side errors (tracebacks in Ray's logs) are not in the steps' output: keep their tails
if [ -f "$RES/failed.txt" ]; then
  { echo "== ray worker errors"; grep -l -r "Traceback" /tmp/ray/session_latest/logs 2>/dev/null | head -5 |
    while read -r f; do echo "-- $f"; tail -40 "$f"; done; } >>"$LOG" 2>&1
fi
python3 benchmarks/summarize.py "$RES" "$OUT/results.json" | tee "$OUT/summary.txt"
