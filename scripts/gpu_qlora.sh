#!/usr/bin/env bash
# Issue 18's GPU evidence in one call: builds lorafit and its gpu tests (build-gpu/), runs the
# NF4 kernel tests, then `lorafit bench` (random weights, bf16 compute, r=16 on all seven
# projections) on the Llama-3.2-1B, Llama-2-7B and Llama-3-8B shapes for LoRA on the bf16 base
# and QLoRA (quantize nf4), each without and with gradient checkpointing, and prints tokens/s,
# peak memory, MFU and QLoRA's ratio to LoRA on the same row. Then the longest context that
# trains Llama-3-8B QLoRA with checkpointing (one step each, doubling until one fails).
# ROWS="shape:seq:batch ..." picks the rows; MAX_CONTEXT=0 skips the context search.
#   bash scripts/gpu_qlora.sh
set -uo pipefail
source scripts/gpu_common.sh
rows="${ROWS:-llama-1b:2048:4 llama2-7b:2048:2 llama3-8b:2048:1}"
gpu_build qlora lorafit lorafit_gpu_tests
./build-gpu/lorafit_gpu_tests "[nf4]" > "$out/qlora-gpu-tests.log" 2>&1
echo "gpu tests [nf4]: exit $? $(tail -2 "$out/qlora-gpu-tests.log" | tr -s '\n' ' ')"
results="$out/qlora.jsonl"
: > "$results"
bench() {  # shape seq batch ckpt quantize [steps warmup]
  ./build-gpu/lorafit bench --shape "$1" --seq "$2" --batch "$3" --device cuda --json \
    --set train.gradient_checkpointing="$4" --quantize "$5" --steps "${6:-10}" --warmup "${7:-3}" \
    2>> "$out/qlora-bench.log" || echo '{}'
}
for row in $rows; do
  IFS=: read -r shape seq batch <<< "$row"
  for ckpt in false true; do
    for quantize in none nf4; do
      echo "{\"row\": \"$row\", \"ckpt\": $ckpt, \"quantize\": \"$quantize\", \"r\": $(bench "$shape" "$seq" "$batch" $ckpt $quantize)}" >> "$results"
    done
  done
done
python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'row':22s} {'ckpt':>5s} {'base':>5s} {'tok/s':>9s} {'GiB':>7s} {'MFU':>6s} {'x LoRA':>7s}")
lora = {}
for r in rows:
    key = (r["row"], r["ckpt"])
    t = r["r"].get("tokens_per_s", 0)
    if r["quantize"] == "none": lora[key] = t
    ratio = f"{t / lora[key]:.2f}" if r["quantize"] == "nf4" and lora.get(key) else ""
    print(f"{r['row']:22s} {str(r['ckpt']):>5s} {r['quantize']:>5s} {t:9.0f} "
          f"{r['r'].get('peak_mem_gib', 0):7.2f} {r['r'].get('mfu', 0):6.3f} {ratio:>7s}")
PY
# Doubling from 32k tokens, then halfway between the longest that trained and the first that
# did not, with the allocator's expandable segments (less fragmentation at these sizes).
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
context() {  # seq -> the bench JSON, or nothing when the step fails
  timeout 300 ./build-gpu/lorafit bench --shape llama3-8b --seq "$1" --batch 1 --device cuda --json \
    --set train.gradient_checkpointing=true --quantize nf4 --steps 1 --warmup 0 2>> "$out/qlora-context.log"
}
ok=0 fail=0 seq=${CONTEXT_START:-32768}
while (( ${MAX_CONTEXT-1} )) && (( seq <= 1048576 )); do
  r=$(context $seq)
  if [ -n "$r" ]; then echo "llama3-8b QLoRA ckpt $seq tokens: $r"; ok=$seq; seq=$((seq * 2));
  else echo "llama3-8b QLoRA ckpt $seq tokens: fails"; fail=$seq; break; fi
done
for _ in 1 2; do
  (( fail > 0 && ok > 0 && fail - ok > 16384 )) || break
  seq=$(( (ok + fail) / 2 / 16384 * 16384 ))
  r=$(context $seq)
  if [ -n "$r" ]; then echo "llama3-8b QLoRA ckpt $seq tokens: $r"; ok=$seq;
  else echo "llama3-8b QLoRA ckpt $seq tokens: fails"; fail=$seq; fi
done
echo "longest context that trains llama3-8b QLoRA with checkpointing: $ok tokens"
