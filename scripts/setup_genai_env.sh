#!/usr/bin/env bash
# A separate environment for the onnxruntime-genai peer used by the benchmarks (.venv-genai).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv-genai"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet torch==2.13.0 transformers==5.23.0 onnx==1.23.2 onnxruntime==1.31.1 \
    onnxruntime-genai==0.18.0 onnx-ir==1.1.0 onnxscript==0.7.2 safetensors==0.8.0
fi
echo "$venv/bin/python"
