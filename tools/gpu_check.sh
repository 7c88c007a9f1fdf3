#!/usr/bin/env bash
# The GPU check (tools/gpu_check.py: verify and measure on a bare CUDA machine, offline; --dry-run
# runs the same steps on CPU). Usage: bash tools/gpu_check.sh [--dry-run] [--wheels DIR] [--out DIR]
exec python3 "$(dirname "$0")/gpu_check.py" "$@"
