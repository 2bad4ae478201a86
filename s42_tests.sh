#!/usr/bin/env bash
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
bash benchmarks/ab.sh run 2 'timeout 80 python benchmarks/int4_probe.py --m 1,2,4,8 --out $OUT/int4_$AB$ROUND.json > $OUT/int4_$AB$ROUND.txt 2>&1' > $OUT/ab.txt 2>&1
echo "ab done $(( $(date +%s) - t0 ))s"
run() { name=$1; t=$2; shift 2; timeout $t python -m pytest -p no:cacheprovider -q -rf "$@" > $OUT/$name.log 2>&1; echo "rc=$?" >> $OUT/$name.log; }
run int4_prefetch 100 tests/kernels/test_quant_int4.py -m "gpu or not gpu" &
run moe 240 tests/model/test_gpu_moe.py -m gpu &
wait
echo "all done $(( $(date +%s) - t0 ))s"
for f in $OUT/*.txt $OUT/*.log; do echo "== $f"; tail -12 $f; done
