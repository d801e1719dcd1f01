#!/usr/bin/env bash
# Fifth sitting, 2x H200, after the layered refactor (issues 11, 12) and the speed split (issue 15).
#   bash benchmarks/gpu_run5.sh tests   GPU tests; tiny float32 model through the whole stack on 1, 2, uneven and
#                                       3-ranks-on-2-GPUs, every all-reduce checked bit-identical, then in CUDA
#                                       graphs: greedy tokens must agree across every configuration
#   bash benchmarks/gpu_run5.sh before  8B at 1 and 2 GPUs (NCCL): the code before the refactor (commit 69e828a,
#                                       carried as .prev: git archive 69e828a raytp | tar -x -C .prev) and after,
#                                       side by side in one sitting
#   bash benchmarks/gpu_run5.sh split   the memory split against the speed split: 70B on cuda:0@48GiB,
#                                       cuda:1@141GiB, and 8B on three ranks of which two share a GPU
# Carry .whl (../shared/gpu/README.md) and .prev; logs and bench folders go to $OUT as one tarball per part.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/raytp_out}; mkdir -p "$OUT"; PART=${1:?tests, before or split}
LOGS=/tmp/sitting5/$PART; mkdir -p "$LOGS"
source benchmarks/gpu_env.sh
python3 -m ray.scripts.scripts start --head --port=6390 --num-gpus="$(nvidia-smi -L | wc -l)" --include-dashboard=false \
  --disable-usage-stats >"$LOGS/ray_start.log" 2>&1 && export RAY_ADDRESS=127.0.0.1:6390
bench() { local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m raytp bench "$@" --out "$LOGS/$name" >"$LOGS/$name.log" 2>&1
  echo "$name rc=$?"; sed -n '/^| devices/,/^$/p' "$LOGS/$name/summary.md" 2>/dev/null | cut -d'|' -f2,5,6,7,8,9,10,12
}
TINY=(--model synthetic:tiny --dtype float32 --batch 1,4 --prompt-len 16 --decode-tokens 32 --repeats 1
      --allreduce-sizes 512 --allreduce-iters 10)
B8=(--model synthetic:llama-3.1-8b --dtype bfloat16 --batch 1,8 --prompt-len 128 --decode-tokens 48 --repeats 1
    --allreduce-iters 50)
case $PART in
tests)
  timeout 300 python3 -m pytest tests/gpu -q -p no:cacheprovider >"$LOGS/gpu_tests.log" 2>&1
  echo "gpu tests: $(tail -1 "$LOGS/gpu_tests.log")"; grep -E "^(FAILED|ERROR)" "$LOGS/gpu_tests.log" | head -5
  bench tiny_checked 200 "${TINY[@]}" --check-identical --devices-sweep "cuda*1;cuda*2;cuda:0@20GiB,cuda:1@60GiB" \
    --comm hoststaged,nccl
  bench tiny_graphs 200 "${TINY[@]}" --devices-sweep "cuda*1;cuda*2;cuda:0@20GiB,cuda:1@60GiB" --comm hoststaged,nccl
  bench tiny_shared 150 "${TINY[@]}" --check-identical --devices "cuda*3" --share-gpus --comm hoststaged
  python3 - "$LOGS" <<'PY'
import json, sys, pathlib
runs = [r for d in ("tiny_checked", "tiny_graphs", "tiny_shared")
        for r in json.loads((pathlib.Path(sys.argv[1]) / d / "results.json").read_text())["runs"]]
tokens = {(r["spec"], r["backend"], r["options"]["check_identical"], d["batch"]): tuple(d["greedy_tokens"])
          for r in runs for d in r["decode"]}
print(f"tiny greedy tokens identical across {len(tokens)} (devices, backend, checked, batch) runs:",
      len(set(tokens.values())) == 1)
PY
  ;;
before)
  # from inside .prev: `python -m` puts the working directory first on the path, and Ray's workers get it too
  (cd .prev && export PYTHONPATH=/tmp/site:$PWD && bench before8b 280 "${B8[@]}" --devices-sweep "cuda*1;cuda*2" --comm nccl)
  bench after8b 280 "${B8[@]}" --devices-sweep "cuda*1;cuda*2" --comm nccl
  ;;
split)
  bench split70b 420 --model synthetic:llama-3.1-70b --dtype bfloat16 --batch 1,8 --prompt-len 128 --decode-tokens 48 \
    --repeats 1 --allreduce-iters 20 --devices "cuda:0@48GiB,cuda:1@141GiB" --comm nccl --split memory,speed
  bench split8b_shared 150 "${B8[@]}" --batch 1 --devices "cuda*3" --share-gpus --comm hoststaged --split memory,speed
  grep -h "split: predicted" "$LOGS"/split*.log | sort -u
  bench tiny_graphs 150 "${TINY[@]}" --devices-sweep "cuda*1;cuda*2" --comm hoststaged,nccl  # graphs still capture
  ;;
esac
python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1
tar -C /tmp/sitting5 -czf "$OUT/sitting5_$PART.tgz" "$PART"
