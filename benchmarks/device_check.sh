#!/usr/bin/env bash
# One prepared GPU session (H100/H200, ~8 minutes): environment, reverse-scan probe, CUDA tests of the Triton
# scan, scan benchmarks, then model, sampling, training and ZigMa-sampling benchmarks (--only
# bench_zigma_sampling for the last alone). Run from anywhere; results land in $OUT (default ./device_results):
#   bash benchmarks/device_check.sh [--only env,probe,...] [--budget SECONDS]
# The project is not installed on the device image: the scan is imported from kernels/ via PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-$PWD/device_results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/kernels:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
"${PYTHON:-python3}" benchmarks/device_check.py all --out "$OUT" "$@"
