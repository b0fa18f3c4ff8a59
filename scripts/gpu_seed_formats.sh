#!/usr/bin/env bash
# Issue 22's GPU-machine check (one call, a few minutes): builds lorafit, then
# scripts/seed_formats_check.py runs MoE-PEFT's and the MixLoRA package's own loading code on
# lorafit's MixLoRA, and lorafit on what MoE-PEFT, PEFT (adapter_model.bin) and LongLoRA
# (trainable_params.bin) write; the folders lorafit read land in $OUT/fixtures.
# The seed tools' Python sources are not part of lorafit: bring them in .gpu-deps/seed, from
# their public repositories at the commits the note names, e.g.
#   git -C MoE-PEFT archive 40f8cb74 moe_peft | tar -x -C .gpu-deps/seed/moe-peft
#   git -C MixLoRA archive d59d09b6 mixlora | tar -x -C .gpu-deps/seed
# Needs .gpu-deps, python3 with torch, transformers, PEFT and sentencepiece.
set -uo pipefail
source scripts/gpu_common.sh
gpu_build seed lorafit
export PYTHONPATH="$PWD/.gpu-deps/seed/moe-peft:$PWD/.gpu-deps/seed:${PYTHONPATH:-}"
python3 scripts/seed_formats_check.py ./build-gpu/lorafit "$out" 2>&1 | tee "$out/seed-formats.log"
status=${PIPESTATUS[0]}
tar -C "$out" -cf "$out/fixtures.tar" fixtures && rm -rf "$out/fixtures"
exit "$status"
