set -x
nvidia-smi --query-gpu=name,memory.used --format=csv
python -c "import torch, triton; print(torch.__version__, triton.__version__)"
export PYTHONPATH=$PWD
mkdir -p $OUT
timeout 200 python -m pytest -q -x tests/gpu/test_packed_gemv.py 2>&1 | tail -25 > $OUT/tests.txt; cat $OUT/tests.txt
timeout 330 python benchmarks/quant_gemv.py --rows 1,16 --sweep int4,fp8 --out $OUT/gemv.json > $OUT/gemv.log 2>&1
grep -v '^{' $OUT/gemv.log | tail -80
