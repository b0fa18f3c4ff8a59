#!/usr/bin/env bash
# The multi-task experiment of docs/experiments/multitask.md, end to end on the CPU (under an
# hour on two cores with OpenBLAS):
#  1. data and a small base model: scripts/make_multitask_data.py, `lorafit init`, then full
#     fine-tuning on copy/rotate (recipes/experiments/multitask_base.yaml);
#  2. LoRA (r=24), MultiLoRA (3 x r=8) and MixLoRA (8 experts x r=4, top-2, LoRA r=8 on
#     attention), about 230k trainable parameters each, on the reverse/sort/increment
#     mixture (recipes/experiments/multitask.yaml): each method at every learning rate of
#     LRS with seed 0, then at its best one with the other SEEDS;
#  3. exact-match accuracy per task on held-out records (`lorafit eval --format chat`): the
#     sweep, and the table of mean and spread over the seeds.
# Runs that already wrote their adapter are reused, so an interrupted experiment continues.
#   bash scripts/experiment_multitask.sh     # OUT=runs/multitask BIN=build/lorafit DEVICE=auto SEEDS="0 1 2"
#                                            # LRS="1e-3 2e-3 5e-3 1e-2" BASE=runs/multitask/base/model
set -euo pipefail
out="${OUT:-runs/multitask}"
bin="${BIN:-build/lorafit}"
device="${DEVICE:-auto}"
seeds="${SEEDS:-0 1 2}"
lrs="${LRS:-1e-3 2e-3 5e-3 1e-2}"
data="$out/data"
python3 scripts/make_multitask_data.py "$data"
source scripts/experiment_base.sh
base_model recipes/experiments/multitask_base.yaml pretrain.jsonl pretrain_valid.jsonl
base="$out/base/model"
declare -A method=(
  [lora]="--set adapter.type=lora"
  [multilora]="--set adapter.type=multilora --set adapter.n=3 --set adapter.r=8 --set adapter.alpha=16"
  [mixlora]="--set adapter.type=mixlora --set adapter.r=8 --set adapter.alpha=16 --set adapter.num_experts=8 --set adapter.top_k=2 --set adapter.expert_r=4 --set adapter.expert_alpha=8 --set adapter.router_aux_loss_coef=0.01"
)
results="$out/results.jsonl"
: > "$results"
score() {  # method lr seed model [adapter]
  for task in reverse sort increment; do
    local r
    r=$("$bin" eval --device "$device" --json --format chat --model "$4" ${5:+--adapter "$5"} --data "$data/valid_$task.jsonl")
    echo "{\"method\": \"$1\", \"lr\": \"$2\", \"seed\": $3, \"task\": \"$task\", \"eval\": $r, \"adapter\": \"${5:-}\"}" >> "$results"
  done
}
run() {  # method lr seed
  local dir="$out/$1-lr$2-s$3"
  if [ ! -f "$dir/adapter/adapter_model.safetensors" ]; then
    "$bin" train recipes/experiments/multitask.yaml --device "$device" --set seed="$3" --set output="$dir" \
      --set model="$base" --set data.train="$data/train.jsonl" --set data.valid="$data/valid.jsonl" \
      --set train.lr="$2" ${method[$1]} 2> "$dir.log"
  fi
  score "$1" "$2" "$3" "$base" "$dir/adapter"
}
score base - 0 "$base"
first=${seeds%% *}
for m in lora multilora mixlora; do
  for lr in $lrs; do run "$m" "$lr" "$first"; done
  best=$(python3 - "$results" "$m" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if json.loads(l)["method"] == sys.argv[2]]
mean = {}
for r in rows:
    mean.setdefault(r["lr"], []).append(r["eval"]["accuracy"])
print(max(mean, key=lambda lr: (sum(mean[lr]), -float(lr))))
PY
)
  for seed in $seeds; do [ "$seed" = "$first" ] || run "$m" "$best" "$seed"; done
done
python3 - "$results" "$first" <<'PY'
import json, statistics, struct, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
first = int(sys.argv[2])
tasks = ["reverse", "sort", "increment"]

def params(adapter):
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

def acc(r):
    return 100 * r["eval"]["accuracy"]

print(f"learning-rate sweep, seed {first}: exact match (%) per task, mean")
print("| method | lr | " + " | ".join(tasks) + " | mean |")
print("|---|---|" + "---|" * (len(tasks) + 1))
for m in ["lora", "multilora", "mixlora"]:
    for lr in sorted({r["lr"] for r in rows if r["method"] == m}, key=float):
        mine = {r["task"]: acc(r) for r in rows if r["method"] == m and r["lr"] == lr and r["seed"] == first}
        print(f"| {m} | {lr} | " + " | ".join(f"{mine[t]:.1f}" for t in tasks) +
              f" | {statistics.mean(mine.values()):.1f} |")

print("\nat each method's best learning rate: exact match (%), mean ± sample std over seeds")
print("| method | lr | trainable params | " + " | ".join(tasks) + " | mean | held-out loss |")
print("|---|---|---|" + "---|" * (len(tasks) + 2))
for m in ["base", "lora", "multilora", "mixlora"]:
    lrs = {r["lr"] for r in rows if r["method"] == m and r["seed"] != first} or {"-"}
    lr = lrs.pop()
    mine = [r for r in rows if r["method"] == m and r["lr"] == lr]
    seeds = sorted({r["seed"] for r in mine})
    def cell(values):
        return f"{values[0]:.1f}" if len(values) == 1 else \
            f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"
    per_task = [[acc(r) for r in mine if r["task"] == t] for t in tasks]
    means = [statistics.mean(acc(r) for r in mine if r["seed"] == s) for s in seeds]
    loss = statistics.mean(r["eval"]["loss"] for r in mine)
    n = params(mine[0]["adapter"]) if mine[0]["adapter"] else 0
    print(f"| {m} | {lr} | {n:,} | " + " | ".join(cell(v) for v in per_task) +
          f" | {cell(means)} | {loss:.3f} |")
print(f"\n300 held-out records per task; seeds {', '.join(str(s) for s in sorted({r['seed'] for r in rows}))}")
PY
