#!/usr/bin/env bash
# The quantized decode kernels on one GPU: their GPU tests, then benchmarks/quant_gemv.py (a table printed last).
set -x
nvidia-smi --query-gpu=name,memory.used --format=csv
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout ${TEST_TIMEOUT:-200} python -m pytest -q -x ${TESTS:-tests/gpu/test_packed_gemv.py} 2>&1 | tail -30 > $OUT/tests.txt
timeout ${BENCH_TIMEOUT:-330} python benchmarks/quant_gemv.py ${BENCH_ARGS:---rows 1,8,16 --sweep int4,fp8} --out $OUT/gemv.json > $OUT/gemv.log 2>&1
cat $OUT/tests.txt
grep -v '^{' $OUT/gemv.log | tail -${TAIL:-80}
