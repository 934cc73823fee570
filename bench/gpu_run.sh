#!/usr/bin/env bash
# The one command the lead runs on the GPU machine, from the repository root:
#
#     bash bench/gpu_run.sh
#
# Installs the wheels carried in .whl/ (if any; the GPU image lacks diffusers) into /tmp/site,
# prints the versions it will use, then runs bench/gpu.py (< 6 min on an H100). Results go to
# $OUT/gpu.json (the device tool's output folder) or bench/results/gpu.json without $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
python3 -c "import sys, torch, diffusers, transformers, peft, safetensors; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, \
'peft', peft.__version__, 'safetensors', safetensors.__version__)"
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR"
python3 bench/gpu.py --out "$OUT_DIR/gpu.json" "$@"
