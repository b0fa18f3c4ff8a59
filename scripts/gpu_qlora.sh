#!/usr/bin/env bash
# Issue 18's GPU evidence in one call: builds lorafit and its gpu tests (build-gpu/), runs the
# NF4 kernel tests, then `lorafit bench` (random weights, bf16 compute, r=16 on all seven
# projections) on the Llama-3.2-1B, Llama-2-7B and Llama-3-8B shapes for LoRA on the bf16 base
# and QLoRA (quantize nf4), each without and with gradient checkpointing, and four QLoRA jobs
# fused on the one 4-bit base (`bench --jobs 4`, each job the row's batch), and prints tokens/s
# (of all jobs), peak memory, MFU and the ratio to LoRA on the same row (for the fused jobs: to
# one QLoRA job). Then the longest context that trains Llama-3-8B QLoRA with checkpointing (one
# step each, doubling until one fails, then halving the gap down to 8192 tokens).
# ROWS="shape:seq:batch ..." picks the rows; MAX_CONTEXT=0 skips the context search;
# CONTEXT_START (32768) is where it starts. A whole run needs more than one 10-minute call:
#   ROWS="llama-1b:2048:4 llama2-7b:2048:2" MAX_CONTEXT=0 bash scripts/gpu_qlora.sh
#   ROWS=llama3-8b:2048:1 CONTEXT_START=163840 bash scripts/gpu_qlora.sh
#   bash scripts/gpu_qlora.sh
set -uo pipefail
source scripts/gpu_common.sh
rows="${ROWS:-llama-1b:2048:4 llama2-7b:2048:2 llama3-8b:2048:1}"
gpu_build qlora lorafit lorafit_gpu_tests
./build-gpu/lorafit_gpu_tests "[nf4]" > "$out/qlora-gpu-tests.log" 2>&1
echo "gpu tests [nf4]: exit $? $(tail -2 "$out/qlora-gpu-tests.log" | tr -s '\n' ' ')"
results="$out/qlora.jsonl"
: > "$results"
bench() {  # shape seq batch ckpt quantize jobs
  ./build-gpu/lorafit bench --shape "$1" --seq "$2" --batch "$3" --device cuda --json \
    --set train.gradient_checkpointing="$4" --quantize "$5" --jobs "$6" --steps 10 --warmup 3 \
    2>> "$out/qlora-bench.log" || echo '{}'
}
for row in $rows; do
  IFS=: read -r shape seq batch <<< "$row"
  for ckpt in false true; do
    for run in none:1 nf4:1 nf4:4; do
      IFS=: read -r quantize jobs <<< "$run"
      echo "{\"row\": \"$row\", \"ckpt\": $ckpt, \"quantize\": \"$quantize\", \"jobs\": $jobs, \"r\": $(bench "$shape" "$seq" "$batch" $ckpt $quantize $jobs)}" >> "$results"
    done
  done
done
python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'row':22s} {'ckpt':>5s} {'base':>5s} {'jobs':>4s} {'tok/s':>9s} {'GiB':>7s} {'MFU':>6s} "
      f"{'ratio':>6s}  ratio to")
one = {}
for r in rows:
    key = (r["row"], r["ckpt"])
    t = r["r"].get("tokens_per_s", 0)
    one[key + (r["quantize"], r["jobs"])] = t
    ref = ("none", 1) if r["jobs"] == 1 else ("nf4", 1)
    base = one.get(key + ref) if (r["quantize"], r["jobs"]) != ("none", 1) else None
    ratio, to = (f"{t / base:.2f}", "LoRA" if r["jobs"] == 1 else "one QLoRA job") if base else ("", "")
    print(f"{r['row']:22s} {str(r['ckpt']):>5s} {r['quantize']:>5s} {r['jobs']:4d} {t:9.0f} "
          f"{r['r'].get('peak_mem_gib', 0):7.2f} {r['r'].get('mfu', 0):6.3f} {ratio:>6s}  {to}")
PY
# Doubling from CONTEXT_START, then halfway between the longest that trained and the first
# that did not, with the allocator's expandable segments (less fragmentation at these sizes).
# A failure prints the run's last error line (what ran out, and how much was allocated).
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
context() {  # seq -> the bench JSON, or nothing when the step fails
  timeout 300 ./build-gpu/lorafit bench --shape llama3-8b --seq "$1" --batch 1 --device cuda --json \
    --set train.gradient_checkpointing=true --quantize nf4 --steps 1 --warmup 0 2>> "$out/qlora-context.log"
}
why() { grep -a "lorafit:" "$out/qlora-context.log" | tail -1 | cut -c1-400; }
ok=0 fail=0 seq=${CONTEXT_START:-32768}
while (( ${MAX_CONTEXT-1} )) && (( seq <= 1048576 )); do
  r=$(context $seq)
  if [ -n "$r" ]; then echo "llama3-8b QLoRA ckpt $seq tokens: $r"; ok=$seq; seq=$((seq * 2));
  else echo "llama3-8b QLoRA ckpt $seq tokens: fails: $(why)"; fail=$seq; break; fi
done
for _ in 1 2 3 4; do
  (( fail > 0 && ok > 0 && fail - ok > 8192 )) || break
  seq=$(( (ok + fail) / 2 / 8192 * 8192 ))
  r=$(context $seq)
  if [ -n "$r" ]; then echo "llama3-8b QLoRA ckpt $seq tokens: $r"; ok=$seq;
  else echo "llama3-8b QLoRA ckpt $seq tokens: fails: $(why)"; fail=$seq; fi
done
echo "longest context that trains llama3-8b QLoRA with checkpointing: $ok tokens"
