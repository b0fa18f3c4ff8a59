#!/usr/bin/env bash
# The multi-task experiment of docs/experiments/multitask.md, end to end on the CPU (about
# 25 minutes on two cores; any device lorafit runs on gives the same kind of table):
#  1. data and a small base model: scripts/make_multitask_data.py, `lorafit init`, then full
#     fine-tuning on copy/rotate (recipes/experiments/multitask_base.yaml);
#  2. LoRA (r=24), MultiLoRA (3 x r=8) and MixLoRA (8 experts x r=4, top-2, LoRA r=8 on
#     attention), about 230k trainable parameters each, on the reverse/sort/increment
#     mixture (recipes/experiments/multitask.yaml), for each seed;
#  3. exact-match accuracy per task on held-out records (`lorafit eval --format chat`), and a
#     table of mean and spread over the seeds.
#   bash scripts/experiment_multitask.sh            # SEEDS="0 1 2" OUT=runs/multitask BIN=build/lorafit
set -euo pipefail
out="${OUT:-runs/multitask}"
bin="${BIN:-build/lorafit}"
seeds="${SEEDS:-0 1 2}"
data="$out/data"
python3 scripts/make_multitask_data.py "$data"
if [ ! -f "$out/base/model/model.safetensors" ]; then
  rm -rf "$out/init"
  "$bin" init --from "$data/base" --out "$out/init" --seed 0
  "$bin" train recipes/experiments/multitask_base.yaml --set model="$out/init" \
    --set output="$out/base" --set data.train="$data/pretrain.jsonl" \
    --set data.valid="$data/pretrain_valid.jsonl" 2> "$out/base.log"
fi
base="$out/base/model"
declare -A method=(
  [lora]="--set adapter.type=lora"
  [multilora]="--set adapter.type=multilora --set adapter.n=3 --set adapter.r=8 --set adapter.alpha=16"
  [mixlora]="--set adapter.type=mixlora --set adapter.r=8 --set adapter.alpha=16 --set adapter.num_experts=8 --set adapter.top_k=2 --set adapter.expert_r=4 --set adapter.expert_alpha=8 --set adapter.router_aux_loss_coef=0.01"
)
results="$out/results.jsonl"
: > "$results"
score() {  # name seed model [adapter]
  for task in reverse sort increment; do
    local r
    r=$("$bin" eval --json --format chat --model "$3" ${4:+--adapter "$4"} --data "$data/valid_$task.jsonl")
    echo "{\"method\": \"$1\", \"seed\": $2, \"task\": \"$task\", \"eval\": $r, \"adapter\": \"${4:-}\"}" >> "$results"
  done
}
score base 0 "$base"
for seed in $seeds; do
  for m in lora multilora mixlora; do
    run="$out/$m-$seed"
    "$bin" train recipes/experiments/multitask.yaml --set seed="$seed" --set output="$run" \
      --set model="$base" --set data.train="$data/train.jsonl" --set data.valid="$data/valid.jsonl" \
      ${method[$m]} 2> "$out/$m-$seed.log"
    score "$m" "$seed" "$base" "$run/adapter"
  done
done
python3 - "$results" <<'PY'
import json, statistics, struct, sys
rows = [json.loads(l) for l in open(sys.argv[1])]

def params(adapter):
    if not adapter:
        return 0
    with open(adapter + "/adapter_model.safetensors", "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    total = 0
    for name, entry in header.items():
        if name != "__metadata__":
            n = 1
            for d in entry["shape"]:
                n *= d
            total += n
    return total

tasks = ["reverse", "sort", "increment"]
print("| method | trainable params | " + " | ".join(tasks) + " | mean | held-out loss |")
print("|---|---|" + "---|" * (len(tasks) + 2))
for m in ["base", "lora", "multilora", "mixlora"]:
    mine = [r for r in rows if r["method"] == m]
    if not mine:
        continue
    seeds = sorted({r["seed"] for r in mine})
    def cell(values):
        values = [100 * v for v in values]
        if len(values) == 1:
            return f"{values[0]:.1f}"
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"
    per_task = [[r["eval"]["accuracy"] for r in mine if r["task"] == t] for t in tasks]
    means = [statistics.mean(r["eval"]["accuracy"] for r in mine if r["seed"] == s) for s in seeds]
    loss = statistics.mean(r["eval"]["loss"] for r in mine)
    print(f"| {m} | {params(mine[0]['adapter']):,} | " + " | ".join(cell(v) for v in per_task) +
          f" | {cell(means)} | {loss:.4f} |")
print(f"\nexact-match accuracy (%) on 300 held-out records per task, mean ± sample std over seeds {', '.join(str(s) for s in sorted({r['seed'] for r in rows if r['method'] != 'base'}))}")
PY
