#!/usr/bin/env bash
# Issue 5's GPU evidence in one call: builds lorafit (build-gpu/, incremental), runs the CPU
# tests of the adapters on LibTorch 2.x, trains MixLoRA and MultiLoRA on CUDA on the quickstart
# data (held-out loss of the base and of each adapter read back from disk), then times plain
# LoRA, MultiLoRA and MixLoRA (8 experts, top-2, r=16) on a Llama-3.2-1B shape and prints
# tokens/s and peak memory side by side. Needs .gpu-deps. About 4 minutes:
#   bash scripts/gpu_mixlora.sh
set -uo pipefail
out="${OUT:-/tmp/lorafit-gpu}"
mkdir -p "$out"
source .gpu-deps/env.sh
{ cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release &&
  cmake --build build-gpu -j"$(nproc)"; } > "$out/mixlora-build.log" 2>&1 ||
  { grep -m20 -A3 error "$out/mixlora-build.log"; exit 1; }
bin=./build-gpu/lorafit

echo "== adapter tests (CPU) on LibTorch $(python3 -c 'import torch;print(torch.__version__)')"
ctest --test-dir build-gpu -R "multilora|mixlora|MixLoRA|MultiLoRA" -j8 > "$out/mixlora-ctest.log" 2>&1
grep -E "tests passed|FAILED|Failed" "$out/mixlora-ctest.log"

echo "== train on CUDA: quickstart data, 200 steps"
work=/tmp/lorafit-mixlora
rm -rf "$work"
model=tests/fixtures/gqa_llama3/model
valid=recipes/data/tiny_valid.jsonl
base=$($bin eval --device cuda --json --model $model --data $valid --max-seq-len 64)
echo "base                  $base"
for type in multilora mixlora; do
  $bin train recipes/quickstart.yaml --device cuda --set output=$work/$type \
    --set adapter.type=$type --set adapter.router_aux_loss_coef=0.01 \
    --set adapter.num_experts=8 --set adapter.top_k=2 2> "$out/mixlora-train-$type.log" ||
    { tail -5 "$out/mixlora-train-$type.log"; continue; }
  printf "%-21s %s\n" "$type" "$($bin eval --device cuda --json --model $model --adapter $work/$type/adapter --data $valid --max-seq-len 64)"
done
tail -1 $work/mixlora/metrics.jsonl

echo "== Llama-3.2-1B shape, r=16 on all seven projections, bf16"
moe="--set adapter.router_aux_loss_coef=0.01 --set adapter.num_experts=8 --set adapter.top_k=2"
results="$out/mixlora-bench.jsonl"
: > "$results"
for row in 2048:4:false 8192:1:true; do
  IFS=: read -r seq batch ckpt <<< "$row"
  for variant in "lora|--set adapter.type=lora" "multilora n=4|--set adapter.type=multilora --set adapter.n=4" \
                 "mixlora 8x top-2|--set adapter.type=mixlora $moe"; do
    name=${variant%%|*}
    r=$($bin bench --shape llama-1b --seq "$seq" --batch "$batch" --device cuda --json \
        --set train.gradient_checkpointing=$ckpt ${variant#*|} 2>> "$out/mixlora-bench.log" || echo '{}')
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
