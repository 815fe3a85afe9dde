#!/usr/bin/env bash
# The prepared GPU run of issue 6, in one call: fused-vs-eager check on CUDA, then the benchmark at
# ~125M and ~350M params. Needs a CUDA build of torch on the machine; writes into $OUT.
#   OUT=/tmp/gpu bash benchmarks/gpu_run.sh
set -euo pipefail
out="${OUT:-benchmarks/out}"
mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:-}:$(pwd)"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.__version__, torch.cuda.get_device_name())" | tee "$out/device.txt"
python benchmarks/check_fused.py --device cuda | tee "$out/check_fused.txt"
python benchmarks/bench_step.py --device cuda --sizes 125m,350m --rounds 20 --out "$out"
