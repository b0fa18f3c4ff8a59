#!/usr/bin/env bash
# One GPU-machine call for LoRA training (issue 3): needs a build in build-gpu
# (scripts/gpu_check.sh makes one) and python3 with transformers and PEFT.
#  1. PEFT loads lorafit's adapter (trained on the CPU, fp32) and transformers loads lorafit's
#     merged checkpoint; both must give lorafit's eval loss to 1e-4.
#  2. On a Llama-3.2-1B shape in bf16 on CUDA, lorafit and PEFT train 20 steps from the same
#     initial adapter on the same batches; the losses must agree within bf16 noise.
set -euo pipefail
out="${OUT:-/tmp/lorafit-gpu}"
mkdir -p "$out"
source .gpu-deps/env.sh
export PYTHONUNBUFFERED=1
bin=./build-gpu/lorafit
work=/tmp/lorafit-train-check
rm -rf "$work" && mkdir -p "$work"

echo "== 1. PEFT and transformers read lorafit's outputs"
model=tests/fixtures/gqa_llama3/model
valid=recipes/data/tiny_valid.jsonl
$bin train recipes/tiny.yaml --device cpu --set output=$work/q 2> "$out/quickstart.log"
$bin merge --model $model --adapter $work/q/adapter --out $work/q/merged --dtype f32
ours=$($bin eval --device cpu --json --model $model --adapter $work/q/adapter --data $valid --max-seq-len 64)
peft=$(python3 scripts/peft_reference.py eval $model $valid 64 $work/q/adapter 2>/dev/null)
merged=$(python3 scripts/peft_reference.py eval $work/q/merged $valid 64 2>/dev/null)
python3 - "$ours" "$peft" "$merged" <<'PY'
import json, sys
ours, peft, merged = (json.loads(a) for a in sys.argv[1:])
for name, ref in (("PEFT + lorafit adapter", peft), ("transformers + lorafit merge", merged)):
    rel = abs(ours["loss"] - ref["loss"]) / ref["loss"]
    print(f"{name:30s} loss {ref['loss']:.6f}  lorafit {ours['loss']:.6f}  rel diff {rel:.2e}  tokens {ref['tokens']}/{ours['tokens']}")
    assert rel < 1e-4 and ref["tokens"] == ours["tokens"], name
PY

echo "== 2. 20 bf16 steps on a Llama-3.2-1B shape, lorafit vs PEFT"
python3 scripts/peft_reference.py make-1b $work/1b > /dev/null 2>&1
cp $model/tokenizer.model $work/1b/model/
cat > $work/1b/recipe.yaml <<YAML
model: $work/1b/model
output: $work/1b/run
device: cuda
dtype: bf16
data: {train: $work/1b/tokens.jsonl, format: tokens, max_seq_len: 512, packing: false, shuffle: false}
adapter: {type: lora, r: 16, alpha: 32, dropout: 0.0, targets: all-linear, init: $work/1b/peft_init}
train: {steps: 20, batch_size: 4, micro_batch_size: 4, lr: 1.0e-4, schedule: constant,
        warmup_steps: 0, weight_decay: 0.0, max_grad_norm: 1.0, log_every: 1, eval_every: 0, save_every: 0}
YAML
$bin train $work/1b/recipe.yaml 2> "$out/train-1b.log"
peft_losses=$(python3 scripts/peft_reference.py train-1b $work/1b 20 2>/dev/null)
python3 - "$work/1b/run/metrics.jsonl" "$peft_losses" <<'PY'
import json, sys
ours = [json.loads(l)["loss"] for l in open(sys.argv[1]) if '"loss"' in l]
peft = json.loads(sys.argv[2])["losses"]
worst = 0.0
print("step  lorafit    PEFT       rel diff")
for i, (a, b) in enumerate(zip(ours, peft)):
    rel = abs(a - b) / b
    worst = max(worst, rel)
    print(f"{i + 1:4d}  {a:.5f}  {b:.5f}  {rel:.2e}")
print(f"largest relative difference over {len(peft)} steps: {worst:.2e}")
assert len(ours) == len(peft) == 20 and worst < 2e-2
PY
