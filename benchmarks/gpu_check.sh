#!/usr/bin/env bash
# Every check that needs a GPU, as one run: the test suite's CUDA cases (the conformance goldens on
# the GPU, CUDA graphs against eager steps, bf16, compiled), the benchmark on the GPU and a
# decoding step's kernels (profile_step.py). About 4 minutes on an H200.
#
#   bash benchmarks/gpu_check.sh [CONFORMANCE_DIR] [BENCH_MODES...]
#
# CONFORMANCE_DIR defaults to $UIO_CONFORMANCE, else ../shared/conformance. On a machine lent
# through the device tool, which receives only the repository, copy the oracle into an ignored
# folder first and carry it (it is never committed):
#   echo /.conformance/ >> .git/info/exclude && cp -r ../shared/conformance .conformance
#   run: bash benchmarks/gpu_check.sh .conformance      (carry: [".conformance"])
# Needs python3 with torch (CUDA), numpy, pillow, msgpack, sentencepiece, safetensors, tqdm, pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
conformance=$(realpath "${1:-${UIO_CONFORMANCE:-../shared/conformance}}")
shift || true
modes=("${@:-fp32 bf16}")
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 UIO_CONFORMANCE="$conformance"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name())" || exit 1
echo "== CUDA tests"
timeout 300 python3 -m pytest -q -rs -p no:cacheprovider -k cuda tests/conformance tests/io/test_runner.py \
    tests/accel/test_steps.py
tests=$?
echo "== benchmark"
timeout 300 python3 benchmarks/bench.py --device cuda --no-load --batches 1 8 --modes ${modes[*]}
bench=$?
echo "== a step's kernels"
(cd benchmarks && timeout 120 python3 profile_step.py)
profile=$?
echo "== tests rc $tests, benchmark rc $bench, profile rc $profile"
exit $(( tests || bench || profile ))
