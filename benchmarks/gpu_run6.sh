#!/usr/bin/env bash
# Sixth sitting, 4x H200: the device-resident decode loop, P2P and redesigned host-staged all-reduces, --comm auto,
# the step profile (issue 13) and quantized weights (issue 14), side by side with the tree before them.
#   bash benchmarks/gpu_run6.sh check   GPU tests; a float32 tiny model through the whole stack on 1, 2, 4 GPUs, uneven
#                                       caps and 6 ranks on 4 GPUs, every backend, eager with every all-reduce checked
#                                       bit-identical and in CUDA graphs: greedy tokens must agree across all runs;
#                                       all-reduce latency in a graph at 2 and 4 ranks, with and without P2P
#   bash benchmarks/gpu_run6.sh perf    8B at 1/2/4 GPUs after, every backend, with the step profile, and before
#                                       (commit 93a863e, carried as .prev: git archive 93a863e raytp | tar -x -C .prev);
#                                       70B at 4 GPUs; P2P disabled; 70B w4a16 on three 24 GiB caps; a 2048-token
#                                       prompt before and after; 8B w4a16 at 2 and 4 GPUs (most important first)
# Carry .whl (../shared/gpu/README.md) and .prev; logs and bench folders go to $OUT as one tarball per part.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/raytp_out}; mkdir -p "$OUT"; PART=${1:?check or perf}
LOGS=/tmp/sitting6/$PART; mkdir -p "$LOGS"
source benchmarks/gpu_env.sh
GPUS=$(nvidia-smi -L | wc -l)
python3 -m ray.scripts.scripts start --head --port=6390 --num-gpus="$GPUS" --include-dashboard=false \
  --disable-usage-stats >"$LOGS/ray_start.log" 2>&1 && export RAY_ADDRESS=127.0.0.1:6390
bench() { local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m raytp bench "$@" --out "$LOGS/$name" >"$LOGS/$name.log" 2>&1
  echo "$name rc=$?"; grep -E "Traceback|Error" "$LOGS/$name.log" | head -3
  sed -n '/^| devices/,/^$/p' "$LOGS/$name/summary.md" 2>/dev/null | cut -d'|' -f2-10 | head -24
}
TINY=(--model synthetic:tiny --dtype float32 --batch 1,4 --prompt-len 16 --decode-tokens 24 --repeats 1
      --allreduce-sizes 4096 --allreduce-iters 10)
B8=(--model synthetic:llama-3.1-8b --dtype bfloat16 --batch 1,8 --prompt-len 128 --decode-tokens 64 --repeats 2
    --allreduce-iters 50)
case $PART in
check)
  timeout 150 python3 -m pytest tests/gpu -q -p no:cacheprovider >"$LOGS/gpu_tests.log" 2>&1
  echo "gpu tests: $(tail -1 "$LOGS/gpu_tests.log")"; grep -E "^(FAILED|ERROR)" "$LOGS/gpu_tests.log" | head -5
  SWEEP="cuda*2;cuda*4;cuda:0@20GiB,cuda:1@60GiB,cuda:2@40GiB"
  bench tiny_checked 90 "${TINY[@]}" --check-identical --devices-sweep "cuda*1;$SWEEP" --comm hoststaged,nccl,p2p
  bench tiny_graphs 90 "${TINY[@]}" --devices-sweep "$SWEEP" --comm hoststaged,nccl,p2p,auto
  bench tiny_shared 50 "${TINY[@]}" --check-identical --devices "cuda*6" --share-gpus --comm hoststaged
  python3 - "$LOGS" <<'PY'
import json, sys, pathlib
runs = [r for d in ("tiny_checked", "tiny_graphs", "tiny_shared") if (pathlib.Path(sys.argv[1]) / d / "results.json").exists()
        for r in json.loads((pathlib.Path(sys.argv[1]) / d / "results.json").read_text())["runs"]]
tokens = {(r["spec"], r["comm"], r["options"]["check_identical"], d["batch"]): tuple(d["greedy_tokens"])
          for r in runs for d in r["decode"]}
print(f"tiny greedy tokens identical across {len(tokens)} (devices, backend, checked, batch) runs:",
      len(set(tokens.values())) == 1)
PY
  for r in 2 4; do
    timeout 80 python3 benchmarks/allreduce_graph.py --ranks $r --sizes 512,4096,8192,65536,1048576 \
      --backends p2p,hoststaged,nccl,nccl-nop2p --out "$LOGS/allreduce.jsonl" >"$LOGS/allreduce_$r.log" 2>&1
    echo "allreduce $r ranks rc=$?"; grep -E "^ +[0-9]+ " "$LOGS/allreduce_$r.log"
  done
  ;;
perf)
  bench after8b 200 "${B8[@]}" --devices-sweep "cuda*1;cuda*2;cuda*4" --comm auto,p2p,nccl,hoststaged --profile 3
  (cd .prev && export PYTHONPATH=/tmp/site:$PWD && bench before8b 100 "${B8[@]}" --devices-sweep "cuda*1;cuda*4" \
    --comm nccl,hoststaged)
  bench after70b 100 --model synthetic:llama-3.1-70b --dtype bfloat16 --batch 1,8 --prompt-len 128 --decode-tokens 48 \
    --repeats 1 --allreduce-iters 20 --devices "cuda*4" --comm auto --profile 3
  bench after8b_nop2p 80 "${B8[@]}" --devices "cuda*4" --comm nccl,hoststaged --no-p2p
  bench quant70b_3x24 90 --model synthetic:llama-3.1-70b --quant w4a16 --dtype bfloat16 --batch 1,8 --prompt-len 128 \
    --decode-tokens 48 --repeats 1 --devices "cuda:0@24GiB,cuda:1@24GiB,cuda:2@24GiB" --comm auto
  bench after8b_p2048 60 "${B8[@]}" --batch 1 --prompt-len 2048 --devices "cuda*4" --comm auto
  (cd .prev && export PYTHONPATH=/tmp/site:$PWD && bench before8b_p2048 60 "${B8[@]}" --batch 1 --prompt-len 2048 \
    --devices "cuda*4" --comm nccl)
  bench quant8b_w4a16 90 "${B8[@]}" --repeats 1 --quant w4a16 --devices-sweep "cuda*2;cuda*4" --comm auto
  ;;
esac
python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1
tar -C /tmp/sitting6 -czf "$OUT/sitting6_$PART.tgz" "$PART"
