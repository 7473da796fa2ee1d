#!/usr/bin/env bash
# Every GPU check of issue 19 in one go, for a lent NVIDIA machine whose time is short.
#
#   bash bench/gpu_check.sh OUT_DIR [TOKENIZER_DIR] [CORPUS_FILE]
#
# Runs with the machine's own python3 (a CUDA build of torch) and this checkout on PYTHONPATH:
#   1. builds the CUDA kernels for the machine's GPU (while the 8B-shaped random folder is written
#      in the background: bench.gpu_streaming --build-only);
#   2. pytest -m cuda with SQUEEZE_KERNELS=cuda: every kernel against the torch reference, the GPU
#      k-means, SqueezeLinear on the GPU, and the streaming engine on the GPU against the CPU path;
#   3. python -m bench.kernels --json: per-layer times against fp16 cuBLAS, the batch crossover,
#      end-to-end decode of an 8B-shaped model;
#   4. python -m bench.gpu_streaming --json: the 8B-shaped model quantized on the GPU.
# Each step has a time limit and writes its log (and numbers) into OUT_DIR as it goes, so a run cut
# short still leaves what it measured. TOKENIZER_DIR: a tokenizer folder for the random model (the
# demo model's, where that package is not installed); CORPUS_FILE: the cleaned calibration text
# (core.data caches it as corpus/enwiki-gensim-v1.txt), where gensim is not installed.
set -u
OUT=${1:?usage: bash bench/gpu_check.sh OUT_DIR [TOKENIZER_DIR] [CORPUS_FILE]}
TOKENIZER=${2:-}
CORPUS=${3:-}
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-520}))
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export SQUEEZE_CACHE_DIR=${SQUEEZE_CACHE_DIR:-/tmp/squeeze-cache}
WORKDIR=${SQUEEZE_BENCH_DIR:-/tmp/squeeze-bench}
if [ -n "$CORPUS" ]; then mkdir -p "$SQUEEZE_CACHE_DIR/corpus" && cp "$CORPUS" "$SQUEEZE_CACHE_DIR/corpus/"; fi
TOKENIZER_ARG=()
if [ -n "$TOKENIZER" ]; then TOKENIZER_ARG=(--tokenizer "$TOKENIZER"); fi
left() { echo $((DEADLINE - SECONDS)); }
step() { echo "=== $(date -u +%T) [$SECONDS s] $*"; }

{
  step "machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  python3 -c 'import sys, torch, transformers; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'
  which nvcc g++ ninja
} >"$OUT/setup.log" 2>&1

python3 -m bench.gpu_streaming --build-only --workdir "$WORKDIR" "${TOKENIZER_ARG[@]}" --jobs 5 >"$OUT/build_8b.log" 2>&1 &
BUILD=$!

{
  step "build the CUDA kernels (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  timeout 300 python3 -c 'import time, cuda_ext; t = time.time(); r = cuda_ext.unavailable_reason("cuda"); print("built" if r is None else r, f"in {time.time() - t:.0f} s")'
} >>"$OUT/setup.log" 2>&1

step "pytest -m cuda" >"$OUT/pytest.log"
SQUEEZE_KERNELS=cuda timeout 240 python3 -m pytest -m cuda -q -p no:cacheprovider -o addopts="" -rfE \
  tests/cuda_ext tests/core/test_layers.py tests/core/test_kmeans.py tests/core/test_streaming_cuda.py -s \
  >>"$OUT/pytest.log" 2>&1
echo "pytest exit $? at $SECONDS s" >>"$OUT/pytest.log"

step "bench.kernels" >"$OUT/kernels.log"
timeout $(( $(left) - 150 > 60 ? $(left) - 150 : 60 )) python3 -m bench.kernels --json "$OUT/kernels.json" >>"$OUT/kernels.log" 2>&1
echo "bench.kernels exit $? at $SECONDS s" >>"$OUT/kernels.log"

wait $BUILD
echo "folder build exit $? at $SECONDS s" >>"$OUT/build_8b.log"
step "bench.gpu_streaming" >"$OUT/gpu_streaming.log"
timeout $(( $(left) > 30 ? $(left) : 30 )) python3 -m bench.gpu_streaming --workdir "$WORKDIR" "${TOKENIZER_ARG[@]}" \
  --json "$OUT/gpu_streaming.json" >>"$OUT/gpu_streaming.log" 2>&1
echo "bench.gpu_streaming exit $? at $SECONDS s" >>"$OUT/gpu_streaming.log"
