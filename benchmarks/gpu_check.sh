#!/usr/bin/env bash
# Every GPU check in one run of under 8 minutes, for a lent GPU machine (torch, transformers and triton
# installed; no model files needed): the CUDA tests, then the GPU benchmark's cases, each under its own
# time limit so that one stuck case cannot take the others' time. Results go to $OUT (default ./gpu-out):
# versions.txt, tests.log, and per group of cases a folder with gpu.json and a log.
#
#     OUT=/tmp/gpu bash benchmarks/gpu_check.sh
set -o pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import torch, transformers; print(torch.cuda.get_device_name(), torch.__version__, transformers.__version__)" \
    | tee "$OUT/versions.txt"
OODLENS_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider --tb=short \
    tests/test_static_cache.py tests/test_flex.py tests/test_offload.py tests/test_attention.py \
    > "$OUT/tests.log" 2>&1
echo "tests: exit $? — $(grep -E '(passed|failed|error)' "$OUT/tests.log" | tail -1)"
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
# the new and unmeasured first: decoding with CUDA graphs, the capture, the band kernel's settings
for cases in "decode,decode-7b,capture" "band-tuning,smollm2"; do
    timeout 200 python3 benchmarks/gpu.py --out "$OUT/${cases%%,*}" --cases "$cases" 2>&1 \
        | tee "$OUT/${cases%%,*}.log" | grep -E "^(decode|==|band|capture|smollm2)|failed" | head -60
done
