#!/usr/bin/env bash
# `make gpu-check`: what only a machine with an NVIDIA GPU can check, in one go.
#
# Builds both libraries with CUDA, generates the zoo, runs the GPU tests (tests/test_gpu.py:
# parity with upstream fully offloaded, in-place states next to a CUDA backend, memory on the
# device, the Engine) and the in-place decode benchmark offloaded and on the host's CPU cores.
# Results: bench/results/inplace_decode_{cuda,cpu}.{json,md}. Extra CMake options go in
# PYLLAMA_SSM_CMAKE_ARGS (e.g. -DGGML_CUDA_FA=OFF halves the CUDA compile for a quick check).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODELS=${GPU_CHECK_MODELS:-qwen35-small,nemotron_h-small}

step() { echo "== $(date +%T) $*"; }

step build; $PY tools/build.py --cuda on
step bindings; $PY tools/build_ffi.py
step zoo; $PY tests/models/generate.py
$PY tests/models/generate.py --size small --arch "$(echo "$MODELS" | sed 's/-small//g')"
step tests; $PY -m pytest -q -x -s tests/test_gpu.py
step "bench (offloaded)"
$PY bench/inplace_decode.py --models "$MODELS" --seqs 1,8,16 --rounds 2 --weights f16 --n-gpu-layers 999 --tag cuda --no-profile
step "bench (CPU cores of this host)"
$PY bench/inplace_decode.py --models "$MODELS" --seqs 1,8,16 --rounds 2 --weights f16,q4_0 --tag cpu  # issue #8: many cores
step done
