#!/usr/bin/env bash
# Issue 19's GPU evidence, lorafit's side: `lorafit train` on a mixed-length instruction set
# (token records with a prompt that does not train and a response that does; lengths
# log-normal with a median of 300 tokens, cut at 2048, as SFT data is), on a Llama-3.2-1B shape
# (random bf16 weights, r=16 on all seven projections), packed (data.packing: true: 8 rows of
# 2048 tokens a step) against padded (packing: false: 8 records a step, each batch padded to
# its longest). Prints real (non-padding) tokens/s, the padding fraction and peak memory, and
# the [packing] GPU tests (varlen flash attention against each record alone). Then the same
# records through `lorafit bench --data` and PEFT + transformers padded (eager, compiled).
# Also the 20-step loss check against PEFT on packed rows. One call of the device tool holds
# 10 minutes, the whole script about 20: PARTS picks what runs (default all of "tests train
# check bench"), SHAPES the bench rows ("shape:batch", default llama-1b:8), e.g.
#   PARTS="tests train check" bash scripts/gpu_packing.sh
#   PARTS=bench SHAPES="llama2-7b:4" PEFT_COMPILE=0 bash scripts/gpu_packing.sh  (eager PEFT only)
# TRAIN_SHAPE names the shape `lorafit train` runs on (default llama-1b; llama2-7b writes a
# random 13 GB checkpoint first). In the bench, PACKINGS picks lorafit's rows (default "true
# false", empty for PEFT alone), PEFT_TIMEOUT bounds each PEFT run (default 300 s) and
# PEFT_PAD_MULTIPLE pads PEFT's batches up to a multiple (default 1), e.g.
#   PARTS=bench PACKINGS= PEFT_COMPILE=1 PEFT_PAD_MULTIPLE=128 PEFT_TIMEOUT=420 bash scripts/gpu_packing.sh
set -uo pipefail
source scripts/gpu_common.sh
steps="${STEPS:-30}"
parts=" ${PARTS:-tests train check bench} "
part() { [[ $parts == *" $1 "* ]] && echo "== $(date +%T) $1"; }
# PEFT's rows alone (PARTS=bench PACKINGS=) need no lorafit build.
if [[ $parts == *" tests "* || $parts == *" train "* || $parts == *" check "* || -n ${PACKINGS-x} ]]; then
  gpu_build packing lorafit lorafit_gpu_tests
fi
if part tests; then
  ./build-gpu/lorafit_gpu_tests "[packing]" > "$out/packing-gpu-tests.log" 2>&1
  echo "gpu tests [packing]: exit $? $(tail -2 "$out/packing-gpu-tests.log" | tr -s '\n' ' ')"
fi
work=/tmp/lorafit-packing
rm -rf "$work" && mkdir -p "$work"
python3 scripts/peft_reference.py make-1b "$work/1b" > /dev/null 2>&1
cp tests/fixtures/gqa_llama3/model/tokenizer.model "$work/1b/model/"
train_shape=${TRAIN_SHAPE:-llama-1b}
train_model=$work/1b/model
if [ "$train_shape" != llama-1b ]; then
  train_model=$work/$train_shape
  python3 - "$train_shape" "$train_model" <<'PY'
import sys
sys.path.insert(0, "scripts")
import torch
from peft_bench import SHAPES
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(max_position_embeddings=131072, rms_norm_eps=1e-5, **SHAPES[sys.argv[1]])
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(sys.argv[2])
PY
  cp tests/fixtures/gqa_llama3/model/tokenizer.model "$train_model/"
fi
python3 - "$work/sft.jsonl" <<'PY'
import json, math, random, sys
rng = random.Random(0)
with open(sys.argv[1], "w") as f:
    for _ in range(4000):
        n = min(2048, max(16, int(rng.lognormvariate(math.log(300), 0.8))))
        prompt = max(4, int(n * rng.uniform(0.2, 0.6)))
        ids = [1] + [rng.randrange(3, 32000) for _ in range(n - 1)]
        f.write(json.dumps({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]}) + "\n")
PY
run() {  # name packing micro_batch
  local peak=$out/packing-mem-$1.txt
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$peak" &
  local poll=$!
  ./build-gpu/lorafit train - > "$out/packing-$1.log" 2>&1 <<YAML
model: $train_model
output: $work/$1
device: cuda
dtype: bf16
data: {train: $work/sft.jsonl, format: tokens, max_seq_len: 2048, packing: $2}
adapter: {type: lora, r: 16, alpha: 32, dropout: 0.0, targets: all-linear}
train: {steps: $steps, batch_size: 8, micro_batch_size: $3, log_every: 5, eval_every: 0,
        save_every: 0, warmup_steps: 2}
YAML
  local rc=$?
  kill $poll 2> /dev/null; wait $poll 2> /dev/null
  python3 - "$work/$1/metrics.jsonl" "$peak" "$1" "$rc" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_s"' in l] if sys.argv[4] == "0" else []
mem = max(int(l) for l in open(sys.argv[2]) if l.strip().isdigit()) / 1024
if not rows:
    print(f"{sys.argv[3]:8s} failed (exit {sys.argv[4]})"); sys.exit()
steady = rows[1:] or rows
tok = sum(r["tokens_per_s"] for r in steady) / len(steady)
pad = sum(r["padding"] for r in steady) / len(steady)
print(f"{sys.argv[3]:8s} {tok:10.0f} real tok/s  padding {pad:5.1%}  GPU memory {mem:6.1f} GiB  "
      f"last loss {rows[-1]['loss']:.3f}")
PY
}
if part train; then
  echo "lorafit train, $train_shape shape, LoRA r=16, $steps steps of 8 rows, mixed-length SFT records"
  run packed true 4
  run padded false 4
fi

if part check; then
  # 20 bf16 steps from PEFT's initial adapter: lorafit on packed rows of 512 tokens against PEFT
  # running each record of the same rows alone (scripts/peft_reference.py packs them as lorafit
  # does); the losses agree within bf16 noise when records never see each other.
  python3 - "$work/1b/records.jsonl" <<'PY'
import json, math, random, sys
rng = random.Random(3)
with open(sys.argv[1], "w") as f:
    for _ in range(400):
        n = min(512, max(8, int(rng.lognormvariate(math.log(100), 0.7))))
        motif = [rng.randrange(3, 32000) for _ in range(8)]
        ids = [1] + (motif * (n // 8 + 1))[: n - 1]
        prompt = max(2, n // 4)
        f.write(json.dumps({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]}) + "\n")
PY
  ./build-gpu/lorafit train - > "$out/packing-check.log" 2>&1 <<YAML
model: $work/1b/model
output: $work/check
device: cuda
dtype: bf16
data: {train: $work/1b/records.jsonl, format: tokens, max_seq_len: 512, packing: true, shuffle: false}
adapter: {type: lora, r: 16, alpha: 32, dropout: 0.0, targets: all-linear, init: $work/1b/peft_init}
train: {steps: 20, batch_size: 4, micro_batch_size: 4, lr: 1.0e-4, schedule: constant,
        warmup_steps: 0, weight_decay: 0.0, max_grad_norm: 1.0, log_every: 1, eval_every: 0, save_every: 0}
YAML
  peft_losses=$(python3 scripts/peft_reference.py train-packed "$work/1b" 20 512 4 2>> "$out/packing-peft.log")
  python3 - "$work/check/metrics.jsonl" "$peft_losses" <<'PY'
import json, sys
ours = [json.loads(l)["loss"] for l in open(sys.argv[1]) if '"loss"' in l]
peft = json.loads(sys.argv[2])["losses"]
worst = max(abs(a - b) / b for a, b in zip(ours, peft))
print("step  lorafit packed  PEFT a record at a time")
for i, (a, b) in enumerate(zip(ours, peft)):
    print(f"{i + 1:4d}  {a:.5f}         {b:.5f}")
print(f"largest relative difference over {len(peft)} steps: {worst:.2e} "
      f"({'within' if len(ours) == len(peft) == 20 and worst < 2e-2 else 'NOT within'} bf16 noise, 2e-2)")
PY
fi

# The same records through `lorafit bench --data` (no weights written: any shape) and through
# PEFT + transformers padded per batch, eager and compiled, in this call. SHAPES="shape:batch"
# (batch: rows of 2048 packed, records padded).
if part bench; then
  results="$out/packing.jsonl"
  : > "$results"
  for row in ${SHAPES:-llama-1b:8}; do
    IFS=: read -r shape batch <<< "$row"
    for packing in ${PACKINGS-true false}; do
      r=$(./build-gpu/lorafit bench --shape "$shape" --data "$work/sft.jsonl" --set data.format=tokens \
          --set data.max_seq_len=2048 --set data.packing=$packing --set train.micro_batch_size=$batch \
          --batch "$batch" --steps 15 --warmup 3 --device cuda --json 2>> "$out/packing-bench.log" || echo '{}')
      echo "{\"shape\": \"$shape\", \"run\": \"lorafit packing: $packing\", \"r\": $r}" >> "$results"
    done
    for compile in ${PEFT_COMPILE:-0 1}; do
      multiple=${PEFT_PAD_MULTIPLE:-1}
      name="PEFT padded$( ((compile)) && echo ', compiled')$( ((multiple > 1)) && echo " x$multiple")"
      r=$(timeout "${PEFT_TIMEOUT:-300}" python3 scripts/peft_sft.py "$shape" "$work/sft.jsonl" "$batch" \
          $compile 15 "$multiple" 2>> "$out/packing-peft.log" || echo '{}')
      echo "{\"shape\": \"$shape\", \"run\": \"$name\", \"r\": $r}" >> "$results"
    done
  done
python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'shape':10s} {'run':26s} {'real tok/s':>11s} {'padding':>8s} {'GiB':>7s} {'x PEFT':>7s}")
peft = {r["shape"]: r["r"].get("tokens_per_s", 0) for r in rows if r["run"] == "PEFT padded"}
for r in rows:
    t = r["r"].get("tokens_per_s", 0)
    ratio = t / peft[r["shape"]] if peft.get(r["shape"]) else 0
    print(f"{r['shape']:10s} {r['run']:26s} {t:11.0f} {r['r'].get('padding', 0):8.1%} "
          f"{r['r'].get('peak_mem_gib', 0):7.2f} {ratio:7.2f}")
PY
fi
