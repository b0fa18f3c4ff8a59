#!/usr/bin/env bash
# Installs, builds, and trains the quickstart recipe: a LoRA on a tiny LLaMA that ships in
# tests/fixtures, on a small corpus that ships in recipes/data. Prints the held-out loss of
# the base model and of the trained adapter. No download; about a minute after the build.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
model=tests/fixtures/gqa_llama3/model
valid=recipes/data/tiny_valid.jsonl
# Records cut to the recipe's data.max_seq_len, as the eval_loss of training reads them.
eval=(./build/lorafit eval --model $model --data $valid --max-seq-len 64)
rm -rf runs/quickstart
echo "== held-out loss of the base model"
"${eval[@]}"
echo "== training (recipes/quickstart.yaml)"
./build/lorafit train recipes/quickstart.yaml
echo "== held-out loss with the trained adapter"
"${eval[@]}" --adapter runs/quickstart/adapter
