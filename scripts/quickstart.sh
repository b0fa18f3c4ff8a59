#!/usr/bin/env bash
# Installs, builds, and evaluates the tiny LLaMA that ships in tests/fixtures (made by
# transformers) on its held-out text, without and with its PEFT LoRA adapter. No download.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
m=tests/fixtures/gqa_llama3
echo "base model:"
./build/lorafit eval --model $m/model --data $m/eval.jsonl --max-seq-len 24
echo "with the PEFT LoRA adapter:"
./build/lorafit eval --model $m/model --adapter $m/lora_all --data $m/eval.jsonl --max-seq-len 24
