#!/usr/bin/env bash
# The host-staged all-reduce kernel on a GPU host: its GPU tests, then microseconds per all-reduce inside CUDA
# graphs at decode sizes (512..65536 bf16 elements), one rank per GPU, old kernel vs new vs NCCL vs NCCL without P2P.
#   bash benchmarks/gpu_hoststaged_check.sh [RANKS] [tests|bench|all]    RANKS defaults to the number of GPUs
# "old" is the kernel of the raytp tree in .prev, when there is one (git archive <commit> raytp | tar -x -C .prev);
# CHUNKS="1024 2048" adds rows for the new kernel at other chunk sizes, SIZES=... other sizes. Logs and rows.jsonl
# go to $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/raytp_out}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh
RANKS=${1:-$(nvidia-smi -L | wc -l)}; PART=${2:-all}; ROWS=$OUT/rows.jsonl; : >"$ROWS"
SIZES=${SIZES:-512,1024,2048,4096,8192,16384,32768,65536}
if [ "$PART" != bench ]; then
  timeout 110 python3 -m pytest tests/test_hoststaged_layout.py tests/gpu/test_hoststaged_kernel.py \
    tests/gpu/test_graphed_decode.py -q --maxfail=3 \
    -p no:cacheprovider >"$OUT/gpu_tests.log" 2>&1
  echo "gpu tests: $(tail -1 "$OUT/gpu_tests.log")"; grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -5
fi
[ "$PART" = tests ] && exit 0
bench() { local name=$1; shift
  timeout 90 python3 benchmarks/allreduce_graph.py --ranks "$RANKS" --sizes "$SIZES" --out "$ROWS" "$@" \
    >"$OUT/$name.log" 2>&1 \
    || { echo "$name failed:"; tail -3 "$OUT/$name.log"; }
}
[ -d .prev/raytp ] && PYTHONPATH=/tmp/site:$PWD/.prev:$PWD bench old --backends hoststaged --label old
bench new --backends "hoststaged$(for c in ${CHUNKS:-}; do printf ',hoststaged:%s' "$c"; done)" --label new
bench nccl --backends nccl,nccl-nop2p
GPUS=$(nvidia-smi -L | wc -l)  # several ranks per GPU, one process each as under Ray: checked, not timed
bench shared --backends hoststaged --ranks $((2 * GPUS)) && tail -1 "$OUT/shared.log"
python3 - "$ROWS" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
names = list(dict.fromkeys(r["backend"] for r in rows))
us = {(r["backend"], r["elements"]): r["us_in_graph"] for r in rows}
print(f"us per all-reduce in a CUDA graph, bf16, {rows[0]['ranks'] if rows else '?'} ranks (median of replays)")
print("| elements | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
for n in sorted({r["elements"] for r in rows}):
    print(f"| {n} | " + " | ".join(f"{us[b, n]:.1f}" if (b, n) in us else "-" for b in names) + " |")
PY
