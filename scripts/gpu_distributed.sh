#!/usr/bin/env bash
# Issue 9 on GPUs (about 4 minutes): builds lorafit against the pip LibTorch (NCCL, and Gloo
# where its headers ship), runs the data-parallel CPU tests (Gloo on 127.0.0.1), then trains
# LoRA r=16 on every projection of a Llama-3.2-1B shape (bf16, 512-token rows, 8 rows per GPU
# per step in micro-batches of 4) with NCCL through torchrun on 1, 2, 4, ... GPUs (as many as
# the machine has) and prints tokens/s and the scaling from one GPU.
# Needs .gpu-deps bundled with Gloo's headers (the pip LibTorch ships none):
#   EXTRA_PKGS=libgloo-dev bash ../shared/gpu/bundle-deps.sh .gpu-deps
# and python3 with torch and transformers.   bash scripts/gpu_distributed.sh
set -uo pipefail
source scripts/gpu_common.sh
steps="${STEPS:-30}"
gpu_build dist lorafit lorafit_cli_tests
bin=$PWD/build-gpu/lorafit
grep -E "LORAFIT_WITH_(GLOO|NCCL)" build-gpu/build.ninja | grep -o "LORAFIT_WITH_[A-Z]*" | sort -u |
  tr '\n' ' ' | sed 's/^/c10d backends built: /'; echo

echo "== data-parallel tests on LibTorch $(python3 -c 'import torch;print(torch.__version__)') (CPU, Gloo)"
./build-gpu/lorafit_cli_tests "[dist]" > "$out/dist-tests.log" 2>&1
echo "exit $? $(tail -2 "$out/dist-tests.log" | tr -s '\n' ' ')"

work=/tmp/lorafit-dist
rm -rf "$work" && mkdir -p "$work"
python3 scripts/peft_reference.py make-1b "$work/1b" > /dev/null 2>&1
cp tests/fixtures/gqa_llama3/model/tokenizer.model "$work/1b/model/"
gpus=$(nvidia-smi -L | wc -l)
echo "== LoRA r=16 on the 1B shape, ${steps} steps, 8 rows of 512 tokens per GPU per step ($gpus GPUs here)"
printf "%-6s %12s %10s\n" GPUs tokens/s scaling
one=""
for ((n = 1; n <= gpus; n *= 2)); do
  cat > "$work/recipe-$n.yaml" <<YAML
model: $work/1b/model
output: $work/run-$n
device: cuda
dtype: bf16
data: {train: $work/1b/tokens.jsonl, format: tokens, max_seq_len: 512, packing: false}
adapter: {type: lora, r: 16, alpha: 32, dropout: 0.0, targets: all-linear}
train: {steps: $steps, batch_size: $((8 * n)), micro_batch_size: 4, lr: 1.0e-4, warmup_steps: 0,
        log_every: 5, eval_every: 0, save_every: 0}
YAML
  python3 -m torch.distributed.run --nproc-per-node $n --no-python "$bin" train \
    "$work/recipe-$n.yaml" > "$out/dist-train-$n.log" 2>&1
  rate=$(python3 -c "
import json
rows = [json.loads(l) for l in open('$work/run-$n/metrics.jsonl') if 'tokens_per_s' in l]
print(sum(r['tokens_per_s'] for r in rows[-3:]) / 3)" 2> /dev/null || echo 0)
  one=${one:-$rate}
  python3 -c "print(f'{$n:<6d} {$rate:12.0f} {($rate / $one if $one else 0):10.2f}')"
done
