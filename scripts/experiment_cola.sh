#!/usr/bin/env bash
# The COLA experiment of docs/experiments/cola.md, end to end: at an equal step budget, on the
# multi-task experiment's small self-trained base (scripts/make_multitask_data.py; base model by
# full fine-tuning from `lorafit init`), LoRA r=8 on every projection (a chain of 1), COLA
# chains of 2 and 3 (the latter also with the learning rate warmed up again after each knot),
# the step-down chain (r=8, then r=4 from 60% of the steps), and full
# fine-tuning, over SEEDS; exact-match accuracy per task on held-out records.
# The LoRA learning rate is the best of LORA_LRS for the chain of 1 at the first seed (COLA
# takes LoRA's hyperparameters, as in the paper); full fine-tuning gets its own, the best of
# FULL_LRS. Runs that already wrote their output are reused.
#   bash scripts/experiment_cola.sh     # OUT=runs/cola BIN=build/lorafit DEVICE=auto SEEDS="0 1 2"
#                                       # BASE=runs/multitask/base/model reuses that base
set -euo pipefail
out="${OUT:-runs/cola}"
bin="${BIN:-build/lorafit}"
device="${DEVICE:-auto}"
seeds="${SEEDS:-0 1 2}"
lora_lrs="${LORA_LRS:-2e-3 5e-3}"
full_lrs="${FULL_LRS:-3e-4 1e-3}"
extra="${EXTRA:-}"  # more --set for every run, e.g. "--set train.steps=20" for a smoke test
data="$out/data"
mkdir -p "$out"
python3 scripts/make_multitask_data.py "$data"
source scripts/experiment_base.sh
base_model recipes/experiments/multitask_base.yaml pretrain.jsonl pretrain_valid.jsonl
base="$out/base/model"
declare -A variant=(
  [lora]="--set cola.links=1"
  [cola2]="--set cola.links=2"
  [cola3]="--set cola.links=3"
  [cola3-rewarm]="--set cola.links=3 --set cola.lr_restart=rewarm"
  [stepdown]="--set cola.knots=[0.6] --set cola.ranks=[8,4]"
  [full]="--set adapter.type=full --set dtype=f32"
)
results="$out/results.jsonl"
: > "$results"
run() {  # name lr seed
  local dir="$out/$1-lr$2-s$3" model adapter
  if [ ! -f "$dir/adapter/adapter_model.safetensors" ] && [ ! -f "$dir/model/model.safetensors" ]; then
    "$bin" train recipes/experiments/multitask.yaml --device "$device" --set seed="$3" \
      --set output="$dir" --set model="$base" --set data.train="$data/train.jsonl" \
      --set data.valid="$data/valid.jsonl" --set train.lr="$2" --set adapter.r=8 \
      --set adapter.alpha=16 ${variant[$1]} $extra 2> "$dir.log"
  fi
  if [ "$1" = full ]; then model="$dir/model"; adapter=""; else model="$base"; adapter="$dir/adapter"; fi
  for task in reverse sort increment; do
    r=$("$bin" eval --device "$device" --json --format chat --model "$model" \
        ${adapter:+--adapter "$adapter"} --data "$data/valid_$task.jsonl")
    echo "{\"method\": \"$1\", \"lr\": \"$2\", \"seed\": $3, \"task\": \"$task\", \"eval\": $r}" >> "$results"
  done
}
best() {  # method: the learning rate with the best mean accuracy at the first seed
  python3 - "$results" "$1" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
acc = {}
for r in rows:
    if r["method"] == sys.argv[2]:
        acc.setdefault(r["lr"], []).append(r["eval"]["accuracy"])
print(max(acc, key=lambda lr: (sum(acc[lr]), -float(lr))))
PY
}
first=${seeds%% *}
for lr in $lora_lrs; do run lora "$lr" "$first"; done
lora_lr=$(best lora)
for lr in $full_lrs; do run full "$lr" "$first"; done
full_lr=$(best full)
for seed in $seeds; do
  for name in lora cola2 cola3 cola3-rewarm stepdown; do run "$name" "$lora_lr" "$seed"; done
  run full "$full_lr" "$seed"
done
python3 - "$results" "$lora_lr" "$full_lr" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
chosen = {"full": sys.argv[3]}
tasks = ["reverse", "sort", "increment"]
print("learning-rate choice at the first seed, mean exact match (%):",
      ", ".join(f"{m} {lr}: {100 * statistics.mean(r['eval']['accuracy'] for r in rows if r['method'] == m and r['lr'] == lr and r['seed'] == min(x['seed'] for x in rows)):.1f}"
                for m, lr in sorted({(r["method"], r["lr"]) for r in rows if r["method"] in ("lora", "full")})))
print("\n| run | lr | " + " | ".join(tasks) + " | mean | held-out loss |")
print("|---|---|" + "---|" * (len(tasks) + 2))
for m in ["lora", "cola2", "cola3", "cola3-rewarm", "stepdown", "full"]:
    lr = chosen.get(m, sys.argv[2])
    mine = [r for r in rows if r["method"] == m and r["lr"] == lr]
    seeds = sorted({r["seed"] for r in mine})
    def cell(v):
        return f"{v[0]:.1f}" if len(v) == 1 else f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}"
    per_task = [[100 * r["eval"]["accuracy"] for r in mine if r["task"] == t] for t in tasks]
    means = [statistics.mean(100 * r["eval"]["accuracy"] for r in mine if r["seed"] == s) for s in seeds]
    losses = [statistics.mean(r["eval"]["loss"] for r in mine if r["seed"] == s) for s in seeds]
    print(f"| {m} | {lr} | " + " | ".join(cell(v) for v in per_task) + f" | {cell(means)} | "
          f"{statistics.mean(losses):.3f} ± {statistics.stdev(losses) if len(losses) > 1 else 0:.3f} |")
print(f"\nexact match (%) on 300 held-out records per task, mean ± sample std over seeds {', '.join(str(s) for s in sorted({r['seed'] for r in rows}))}")
PY
