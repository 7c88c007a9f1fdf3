#!/usr/bin/env bash
# Compile-check the CUDA side of the extension on a machine without a CUDA torch (used by CI):
# the kernels are compiled to objects with nvcc for sm_80 and sm_90, and the host wrappers
# (dispatch_cuda.cpp, bindings.cpp with WITH_CUDA) are syntax-checked against the installed CPU
# torch's headers, which lack only one generated header (a stub is written for it).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvcc >/dev/null 2>&1; then
  echo "csrc: nvcc not found; skipping the compile check of the CUDA sources"
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

nvcc -c -std=c++17 -O3 -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 \
  csrc/dispatch_cuda_kernels.cu -o "$work/dispatch_cuda_kernels.o"
echo "csrc: CUDA kernels compile for sm_80 and sm_90"

cuda_home="${CUDA_HOME:-/usr/local/cuda}"
torch_dir="$(python -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
python_include="$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
mkdir -p "$work/stub/c10/cuda/impl"
echo "#define C10_CUDA_BUILD_SHARED_LIBS" > "$work/stub/c10/cuda/impl/cuda_cmake_macros.h"
for source in csrc/dispatch_cuda.cpp csrc/bindings.cpp; do
  g++ -fsyntax-only -std=c++20 -DWITH_CUDA -DTORCH_EXTENSION_NAME=_csrc \
    -I"$torch_dir/include" -I"$torch_dir/include/torch/csrc/api/include" -I"$work/stub" \
    -I"$python_include" -I"$cuda_home/include" "$source"
done
echo "csrc: CUDA host wrappers compile against torch's headers"
