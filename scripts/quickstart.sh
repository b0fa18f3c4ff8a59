#!/usr/bin/env bash
# Installs, builds lorafit, and teaches a real pretrained model a new character: a LoRA on
# stories260K (recipes/models/stories260k, pretrained on TinyStories) learns stories about Zib,
# a little blue robot it has never met (recipes/data/stories_*.jsonl). Prints the held-out loss
# and a greedy story before and after. No download beyond apt; about a minute after the build.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh lorafit
model=recipes/models/stories260k
prompt="Once upon a time, there was a little robot named"
# Records cut to the recipe's data.max_seq_len, as the eval_loss of training reads them.
eval=(./build/lorafit eval --model $model --data recipes/data/stories_valid.jsonl --max-seq-len 128)
# generate prints the continuation alone, without the space sentencepiece puts before its first
# word: the prompt and it are joined with one.
story=(./build/lorafit generate --model $model --prompt "$prompt" --max-new-tokens 80)
rm -rf runs/quickstart
echo "== the pretrained model: held-out loss, and its story"
"${eval[@]}"
echo "$prompt $("${story[@]}")"
echo
echo "== training a LoRA (recipes/quickstart.yaml)"
./build/lorafit train recipes/quickstart.yaml
echo "== with the LoRA: held-out loss, and its story"
"${eval[@]}" --adapter runs/quickstart/adapter
echo "$prompt $("${story[@]}" --adapter runs/quickstart/adapter)"
