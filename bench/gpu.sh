#!/usr/bin/env bash
# The GPU checks in one run, for a machine with CUDA and PyTorch (the `device` tool's, say):
# the CUDA-graph tests, then the decoding and training benches on the GPU, each log under $OUT.
#
#     bash bench/gpu.sh            # from the repository root
#
# The service bench runs where the web stack is installed too (fastapi, sqlalchemy, alembic,
# pydantic-settings, uvicorn; on the device tool's machine, carried as wheels, see its README).
# SmolLM2's rows need its GGUF, which such a machine may lack.
set -uo pipefail
out=${OUT:-/tmp/scratchgpt-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
status=0
step() {  # name, command...: run it, its output also in $out/name.log
    local name=$1; shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log" || status=1
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
# --noconftest: the suite's conftest builds the CPU kernels first, minutes that these tests do not need.
step tests "$py" -m pytest -q --noconftest tests/core/fast/test_cuda_graphs.py
step generate "$py" bench/generate.py --device cuda --repeats 3
step train "$py" bench/train.py --device cuda --steps 10 --warmup 3
step train-long "$py" bench/train.py --device cuda --batch 8 --context 1024 --steps 10 --warmup 3 --precisions bf16
if "$py" -c "import fastapi, sqlalchemy, alembic, pydantic_settings, uvicorn" 2>/dev/null; then
    step serve "$py" bench/serve.py --device cuda --duration 10 --ttft-samples 10
else
    echo "== serve: skipped, the web stack is not installed"
fi
exit $status
