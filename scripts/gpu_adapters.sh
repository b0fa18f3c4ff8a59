#!/usr/bin/env bash
# The GPU evidence of issues 5 and 6 in one call (about 5 minutes):
#  1. builds lorafit (build-gpu/, incremental) and runs the CPU test suite on LibTorch 2.x;
#  2. trains on CUDA on the quickstart data: MultiLoRA, MixLoRA, a COLA chain (3 links, ranks
#     8, 8, 4) and full fine-tuning from `lorafit init`; held-out loss of each, read from disk;
#  3. PEFT loads the COLA chain's export (trained on the CPU in fp32) and must get lorafit's
#     eval loss;
#  4. times plain LoRA, MultiLoRA and MixLoRA (8 experts, top-2, r=16) on a Llama-3.2-1B
#     shape and prints tokens/s and peak memory side by side.
# Needs .gpu-deps, python3 with transformers and PEFT.   bash scripts/gpu_adapters.sh
set -uo pipefail
source scripts/gpu_common.sh
gpu_build adapters
bin=./build-gpu/lorafit

echo "== 1. CPU tests on LibTorch $(python3 -c 'import torch;print(torch.__version__)')"
ctest --test-dir build-gpu -LE gpu -j"$(nproc)" > "$out/adapters-ctest.log" 2>&1
grep -E "tests passed|\(Failed\)" "$out/adapters-ctest.log"

echo "== 2. train on CUDA: quickstart data, 200 steps"
work=/tmp/lorafit-adapters
rm -rf "$work" && mkdir -p "$work"
model=tests/fixtures/gqa_llama3/model
valid=recipes/data/tiny_valid.jsonl
evaluate() { $bin eval --device cuda --json --data $valid --max-seq-len 64 "$@"; }
printf "%-28s %s\n" "base" "$(evaluate --model $model)"
declare -A sets=(
  [multilora]="--set adapter.type=multilora"
  [mixlora]="--set adapter.type=mixlora --set adapter.router_aux_loss_coef=0.01 --set adapter.num_experts=8 --set adapter.top_k=2"
  [cola]="--set cola.links=3 --set cola.ranks=[8,8,4]"
)
for name in multilora mixlora cola; do
  $bin train recipes/tiny.yaml --device cuda --set output=$work/$name ${sets[$name]} \
    2> "$out/adapters-train-$name.log" || { tail -3 "$out/adapters-train-$name.log"; continue; }
  printf "%-28s %s\n" "$name (bf16 base)" "$(evaluate --model $model --adapter $work/$name/adapter)"
done
$bin init --from $model --out $work/init --seed 1 2> /dev/null
$bin train recipes/tiny.yaml --device cuda --set output=$work/full --set adapter.type=full \
  --set model=$work/init --set train.lr=3e-3 2> "$out/adapters-train-full.log" &&
  printf "%-28s %s\n" "full from init (fp32)" "$(evaluate --model $work/full/model)" &&
  printf "%-28s %s\n" "  its random init" "$(evaluate --model $work/init)"

echo "== 3. PEFT reads the COLA chain (trained on the CPU, fp32)"
$bin train recipes/tiny.yaml --device cpu --set output=$work/cola-cpu \
  --set cola.links=3 "--set" "cola.ranks=[8,8,4]" 2> "$out/adapters-train-cola-cpu.log"
ours=$($bin eval --device cpu --json --model $model --adapter $work/cola-cpu/adapter --data $valid --max-seq-len 64)
peft=$(python3 scripts/peft_reference.py eval $model $valid 64 $work/cola-cpu/adapter 2>/dev/null)
python3 - "$ours" "$peft" <<'PY'
import json, sys
ours, peft = (json.loads(a) for a in sys.argv[1:])
rel = abs(ours["loss"] - peft["loss"]) / peft["loss"]
print(f"PEFT + chain of 3 (r=20)  loss {peft['loss']:.6f}  lorafit {ours['loss']:.6f}  rel diff {rel:.2e}  tokens {peft['tokens']}/{ours['tokens']}")
assert rel < 1e-4 and peft["tokens"] == ours["tokens"]
PY

echo "== 4. Llama-3.2-1B shape, r=16 on all seven projections, bf16"
moe="--set adapter.router_aux_loss_coef=0.01 --set adapter.num_experts=8 --set adapter.top_k=2"
results="$out/adapters-bench.jsonl"
: > "$results"
for row in 2048:4:false 8192:1:true; do
  IFS=: read -r seq batch ckpt <<< "$row"
  for variant in "lora|--set adapter.type=lora" "multilora n=4|--set adapter.type=multilora --set adapter.n=4" \
                 "mixlora 8x top-2|--set adapter.type=mixlora $moe"; do
    name=${variant%%|*}
    r=$($bin bench --shape llama-1b --seq "$seq" --batch "$batch" --device cuda --json \
        --set train.gradient_checkpointing=$ckpt ${variant#*|} 2>> "$out/adapters-bench.log" || echo '{}')
    echo "{\"row\": \"${seq}x${batch} ckpt=$ckpt\", \"adapter\": \"$name\", \"r\": $r}" >> "$results"
  done
done
python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'row':20s} {'adapter':18s} {'tokens/s':>9s} {'vs lora':>7s} {'GiB':>6s} {'trainable':>11s}")
lora = {}
for r in rows:
    o = r["r"]
    if r["adapter"] == "lora": lora[r["row"]] = o.get("tokens_per_s", 0)
    ref = lora.get(r["row"], 0)
    ratio = o.get("tokens_per_s", 0) / ref if ref else 0
    print(f"{r['row']:20s} {r['adapter']:18s} {o.get('tokens_per_s', 0):9.0f} {ratio:7.2f} "
          f"{o.get('peak_mem_gib', 0):6.1f} {o.get('trainable_params', 0):11,d}")
PY
