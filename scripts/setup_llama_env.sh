#!/usr/bin/env bash
# A separate environment for the llama.cpp peer used by the runtime benchmark (.venv-llama).
#
# Builds llama-cpp-python from source, CPU only, for this machine's best vector ISA (GGML_NATIVE=ON), plus
# what the vendored llama.cpp's convert_hf_to_gguf.py needs (torch, transformers, gguf, sentencepiece). The
# sdist is kept in .venv-llama/src so llama_peer.py can run the vendored converter. Idempotent: when the
# venv already imports llama_cpp at the pinned version it does nothing. Prints the venv's python last.
#
# `--isa avx2` builds it for AVX2 + FMA + F16C only (no AVX-512) into .venv-llama-avx2: llama.cpp as it runs
# on an AVX2 machine, for comparisons on an AVX-512 one (bench_runtime.py with QWEN_CPU_KERNELS=avx2).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
isa="native"
if [ "${1:-}" = "--isa" ]; then
  isa="${2:-}"
  [ "$isa" = "avx2" ] || [ "$isa" = "native" ] || { echo "--isa takes avx2 or native, not '$isa'" >&2; exit 2; }
fi
venv="$root/.venv-llama"
isa_flags="-DGGML_NATIVE=ON"
if [ "$isa" = "avx2" ]; then
  venv="$root/.venv-llama-avx2"
  isa_flags="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
-DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF"
fi
version="0.3.36"  # vendored llama.cpp has LLM_ARCH_QWEN35MOE ("qwen35moe") and conversion/qwen.py for it
src="$venv/src/llama_cpp_python-$version"
start=$(date +%s)

if "$venv/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$version')" 2>/dev/null \
  && [ -f "$src/vendor/llama.cpp/convert_hf_to_gguf.py" ]; then
  echo "llama-cpp-python $version already built in $venv" >&2
  echo "$venv/bin/python"
  exit 0
fi

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
# Converter dependencies (torch from the local CPU wheel when present; transformers 5.x knows qwen3_5_moe).
"$venv/bin/python" -m pip install --quiet torch==2.13.0 transformers==5.23.0 safetensors==0.8.0 \
  "numpy>=2,<2.5" "sentencepiece>=0.1.98,<0.3.0" "protobuf>=4.21" \
  "scikit-build-core[pyproject]>=0.9.2,<1" cmake ninja typing-extensions diskcache jinja2

mkdir -p "$venv/src"
if [ ! -f "$src/pyproject.toml" ]; then
  "$venv/bin/python" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" \
    -d "$venv/src"
  tar -xzf "$venv/src/llama_cpp_python-$version.tar.gz" -C "$venv/src"
fi
# The gguf package that matches the vendored llama.cpp (it knows the qwen35moe tensor names).
"$venv/bin/python" -m pip install --quiet "$src/vendor/llama.cpp/gguf-py"

# CPU only, native ISA (AVX-512 / VNNI where the CPU has them) or AVX2, OpenMP threading, no BLAS, no
# server/tools.
export CMAKE_ARGS="$isa_flags -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF \
-DGGML_OPENMP=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
-DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
"$venv/bin/python" -m pip install --no-build-isolation --no-deps --force-reinstall --verbose "$src" \
  > "$venv/build.log" 2>&1 || { tail -40 "$venv/build.log" >&2; exit 1; }
"$venv/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, \
llama_cpp.llama_print_system_info().decode())" >&2
echo "built in $(( $(date +%s) - start )) s" >&2
echo "$venv/bin/python"
