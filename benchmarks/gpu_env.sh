# Sourced by the GPU sitting scripts (benchmarks/gpu_run*.sh): the environment of every process on a GPU host (NVLink
# multicast off, see ../shared/gpu/README.md) and Ray from the carried .whl wheelhouse.
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -d .whl ] && ! python3 -c "import ray" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD

# bench NAME LIMIT ARGS...: `raytp bench ARGS` into $OUT/NAME (set OUT first), its summary table printed, the folder
# sent back as one tarball (few files)
bench() { local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m raytp bench "$@" --out "$OUT/$name" >"$OUT/$name.log" 2>&1
  echo "$name rc=$?"; grep -E "Traceback|Error" "$OUT/$name.log" | head -3
  sed -n '/^| devices/,/^$/p' "$OUT/$name/summary.md" 2>/dev/null | cut -d'|' -f2-12 | head -14
  tar -czf "$OUT/$name.tgz" -C "$OUT" "$name" && rm -r "${OUT:?}/$name"
}
