#!/usr/bin/env bash
# One GPU-machine call for the foundation: builds lorafit against the machine's PyTorch
# LibTorch (CUDA), runs the CPU test suite there (LibTorch 2.x paths), writes a
# Llama-3.2-1B-shaped checkpoint and transformers' logits (scripts/gpu_reference.py), and runs
# the `gpu` tests: bf16 logits against transformers' and the checkpoint's loading speed, cold
# (page cache dropped, where the machine allows it) and warm, beside a plain sequential read.
#
# Needs .gpu-deps (../shared/gpu/bundle-deps.sh). Run from the repository root:
#   bash scripts/gpu_check.sh            # logs go to $OUT (or /tmp/lorafit-gpu)
set -uo pipefail
status=0
source scripts/gpu_common.sh

echo "== build"
gpu_build check

echo "== CPU tests on LibTorch $(python3 -c 'import torch;print(torch.__version__)')"
ctest --test-dir build-gpu -LE gpu -j8 > "$out/ctest-cpu.log" 2>&1 || status=1
grep -E "tests passed|FAILED|SEGFAULT|Failed" "$out/ctest-cpu.log" || true

echo "== reference checkpoint"
ref=/tmp/lorafit-gpu-ref
python3 scripts/gpu_reference.py "$ref" > "$out/reference.log" 2>&1 || { tail -30 "$out/reference.log"; exit 1; }
du -sh "$ref/model"

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null && echo "(page cache dropped)" || echo "(page cache could not be dropped)"; }

echo "== sequential read of the checkpoint (cold)"
drop_caches
dd if="$ref/model/model.safetensors" of=/dev/null bs=64M 2>&1 | tail -n 1

echo "== gpu tests (cold cache, then warm)"
drop_caches
LORAFIT_GPU_REFERENCE="$ref" ./build-gpu/lorafit_gpu_tests --success 2>&1 | grep -E "load:|relative|passed|failed" | tee "$out/gpu-cold.log"
LORAFIT_GPU_REFERENCE="$ref" ./build-gpu/lorafit_gpu_tests 2>&1 | grep -E "load:|relative|passed|failed" | tee "$out/gpu-warm.log"
exit $status
