#!/usr/bin/env bash
# The passkey experiment of docs/experiments/passkey.md, end to end (a few minutes on a GPU;
# the extensions at 512 tokens are slow on two CPU cores):
#  1. data and a base model that knows 128 positions (scripts/make_passkey_data.py,
#     `lorafit init`, full fine-tuning at 128: recipes/experiments/passkey_base.yaml);
#  2. the base extended 4x to 512 positions (linear RoPE interpolation) on long documents
#     (recipes/experiments/passkey_extend.yaml), for each seed: LoRA with groups but no shift,
#     S2-Attn with LoRA, S2-Attn with LoRA and trainable embeddings and norms, and, for
#     reference, LoRA with full attention;
#  3. retrieval accuracy (exact match of the key) with full attention at 512 tokens on
#     held-out documents, and at 128 on short ones.
#   bash scripts/experiment_passkey.sh     # OUT=runs/passkey BIN=build/lorafit DEVICE=auto SEEDS="0 1 2"
#                                          # BASE=runs/passkey/base/model EXTRA="--set train.steps=1200"
set -euo pipefail
out="${OUT:-runs/passkey}"
bin="${BIN:-build/lorafit}"
device="${DEVICE:-auto}"
seeds="${SEEDS:-0 1 2}"
extra="${EXTRA:-}"  # more --set for every extension, e.g. "--set train.steps=1200"
data="$out/data"
mkdir -p "$out"
python3 scripts/make_passkey_data.py "$data"
source scripts/experiment_base.sh
base_model recipes/experiments/passkey_base.yaml short_train.jsonl short_valid.jsonl
base="$out/base/model"
declare -A variant=(
  [no-shift]="--set longlora.shift=none"
  [s2]="--set longlora.shift=roll"
  [s2-embed-norm]="--set longlora.shift=roll --set longlora.trainable=[embed,norm]"
  [full-attention]="--set longlora.group_ratio=1 --set longlora.shift=none"
)
results="$out/results.jsonl"
: > "$results"
score() {  # name seed [adapter]
  for set in long:512 short:128; do
    local r
    r=$("$bin" eval --device "$device" --json --format chat --max-seq-len "${set#*:}" \
        --model "$base" ${3:+--adapter "$3"} --data "$data/${set%%:*}_valid.jsonl")
    echo "{\"run\": \"$1\", \"seed\": $2, \"set\": \"${set%%:*}\", \"eval\": $r}" >> "$results"
  done
}
score base 0
for seed in $seeds; do
  for name in no-shift s2 s2-embed-norm full-attention; do
    dir="$out/$name-s$seed"
    if [ ! -f "$dir/adapter/adapter_model.safetensors" ]; then
      "$bin" train recipes/experiments/passkey_extend.yaml --device "$device" --set seed="$seed" \
        --set output="$dir" --set model="$base" --set data.train="$data/long_train.jsonl" \
        --set data.valid="$data/long_valid.jsonl" ${variant[$name]} $extra 2> "$dir.log"
    fi
    score "$name" "$seed" "$dir/adapter"
  done
done
python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def cell(v):
    return f"{v[0]:.1f}" if len(v) == 1 else f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}"
print("| run | passkey at 512 (%) | passkey at 128 (%) | loss at 512 | records at 512 |")
print("|---|---|---|---|---|")
for name in ["base", "no-shift", "s2", "s2-embed-norm", "full-attention"]:
    mine = [r for r in rows if r["run"] == name]
    if not mine:
        continue
    long = [r for r in mine if r["set"] == "long"]
    short = [r for r in mine if r["set"] == "short"]
    print(f"| {name} | {cell([100 * r['eval']['accuracy'] for r in long])} | "
          f"{cell([100 * r['eval']['accuracy'] for r in short])} | "
          f"{statistics.mean(r['eval']['loss'] for r in long):.3f} | {long[0]['eval']['records']} |")
print(f"\nexact match of the key on 300 held-out documents, mean ± sample std over seeds "
      f"{', '.join(str(s) for s in sorted({r['seed'] for r in rows if r['run'] != 'base'}))}")
PY
