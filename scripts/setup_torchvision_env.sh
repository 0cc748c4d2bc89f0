#!/usr/bin/env bash
# A separate environment with torchvision (.venv-torchvision) for the processor reference
# (scripts/make_processor_reference.py): transformers' processors with their stock torchvision backends.
# The project's pinned torch 2.13.0 CPU build has no torchvision that imports beside it, so this venv takes
# torch 2.14.1 + torchvision 0.29.1 (on x86_64 a CUDA build, ~5.5 GB) and the project's own pins for the rest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv-torchvision"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet torch==2.14.1 torchvision==0.29.1 transformers==5.23.0 \
    tokenizers==0.23.3 pillow==13.0.0 numpy==2.4.6 safetensors==0.8.0
fi
"$venv/bin/python" -c "import torch, torchvision, transformers; print(torch.__version__, torchvision.__version__, transformers.__version__)" >&2
echo "$venv/bin/python"
