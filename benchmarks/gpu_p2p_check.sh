#!/usr/bin/env bash
# The P2P all-reduce on a GPU host of 2+ GPUs (issue 13, deliver 2 and 4), one sitting:
#   1. GPU tests of p2p (tests/gpu/test_p2p_allreduce.py): bit-identical on every rank and equal to the float32
#      rank-order sum, eager and in a CUDA graph, one-shot and two-shot; a rank that never arrives; through Ray
#   2. all-reduce latency inside a CUDA graph, p2p vs host-staged vs NCCL, bf16, 4096/8192/65536 elements
#   3. tiny model end to end through Ray: --comm p2p and auto (every all-reduce checked bit-identical), p2p with
#      CUDA graphs, then auto with --no-p2p; greedy tokens must agree across all four
# Carry .whl (../shared/gpu/README.md). Logs go to $OUT/p2p_check.tgz; a short table is printed last.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/raytp_out}; mkdir -p "$OUT"
LOGS=/tmp/p2p_check; mkdir -p "$LOGS"
source benchmarks/gpu_env.sh
nvidia-smi topo -m >"$LOGS/topo.txt" 2>&1
timeout 100 python3 -m pytest tests/gpu/test_p2p_allreduce.py -q -p no:cacheprovider >"$LOGS/gpu_tests.log" 2>&1
echo "p2p gpu tests rc=$?: $(tail -1 "$LOGS/gpu_tests.log")"; grep -E "^(FAILED|ERROR)|Error" "$LOGS/gpu_tests.log" | head -8
timeout 45 python3 benchmarks/allreduce_graph.py --ranks 2 --sizes 4096,8192,65536 --iters 100 \
  --out "$LOGS/allreduce_graph.json" >"$LOGS/allreduce_graph.log" 2>&1
echo "allreduce_graph rc=$?"
python3 -m ray.scripts.scripts start --head --port=6390 --num-gpus="$(nvidia-smi -L | wc -l)" --include-dashboard=false \
  --disable-usage-stats >"$LOGS/ray_start.log" 2>&1 && export RAY_ADDRESS=127.0.0.1:6390
bench() { local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m raytp bench "$@" --out "$LOGS/$name" >"$LOGS/$name.log" 2>&1
  echo "$name rc=$?"; grep -E "all-reduce (backend|  *[0-9]+ elements)|P2P cannot|WARNING" "$LOGS/$name.log" | head -20
}
TINY=(--model synthetic:tiny --dtype float32 --devices "cuda*2" --batch 1 --prompt-len 16 --decode-tokens 16
      --repeats 1 --allreduce-sizes 4096 --allreduce-iters 10)
bench tiny_checked 50 "${TINY[@]}" --comm p2p,auto --check-identical
bench tiny_p2p_graphs 35 "${TINY[@]}" --comm p2p
bench tiny_no_p2p 35 "${TINY[@]}" --comm auto --no-p2p
python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1
tar -C /tmp -czf "$OUT/p2p_check.tgz" p2p_check
python3 - "$LOGS" <<'PY'
import json, sys, pathlib
logs = pathlib.Path(sys.argv[1])
runs = []
for d in ("tiny_checked", "tiny_p2p_graphs", "tiny_no_p2p"):
    f = logs / d / "results.json"
    runs += [(d, r) for r in json.loads(f.read_text())["runs"]] if f.exists() else []
tokens = {(d, r["comm"], r["backend"], x["batch"]): tuple(x["greedy_tokens"]) for d, r in runs for x in r["decode"]}
print(f"tiny greedy tokens identical across {len(tokens)} runs ({'; '.join(f'{d} {c}->{b}' for d, c, b, _ in tokens)}):",
      len(set(tokens.values())) == 1)
for d, r in runs:
    for name, us in r.get("backend_us", {}).items():
        print(f"{d} --comm {r['comm']}: float32 graph us {name:>10}: " + ", ".join(f"{n}: {v:.1f}" for n, v in us.items()))
f = logs / "allreduce_graph.json"
if f.exists():
    print(f"{'ranks':>5} {'backend':>10} {'elements':>9} {'us/all-reduce bf16 (graph)':>27}")
    for row in map(json.loads, f.read_text().splitlines()):
        print(f"{row['ranks']:>5} {row['backend']:>10} {row['elements']:>9} {row['us_in_graph']:>27.1f}")
PY
