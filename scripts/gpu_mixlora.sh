#!/usr/bin/env bash
# Issue 20's MixLoRA row in one call (about 3 minutes): builds build-gpu/, runs the GPU tests of
# MixLoRA's slot kernel and of MixLoRA against MoE-PEFT's per-expert path in bf16, then times
# LoRA and MixLoRA (8 experts, top 2, r=16 on all seven projections, router_aux_loss_coef 0.01)
# on a Llama-3.2-1B shape, 2048x4, without and with checkpointing, prints MixLoRA's tokens/s as
# a share of LoRA's, and where MixLoRA's GPU time goes (scripts/profile_summary.py).
#   bash scripts/gpu_mixlora.sh
set -uo pipefail
source scripts/gpu_common.sh
gpu_build mixlora lorafit lorafit_gpu_tests
./build-gpu/lorafit_gpu_tests "[kernels],[mixlora]" > "$out/mixlora-gpu-tests.log" 2>&1
echo "gpu tests [kernels],[mixlora]: exit $? $(tail -2 "$out/mixlora-gpu-tests.log" | tr -s '\n' ' ')"
moe="--set adapter.type=mixlora --set adapter.num_experts=8 --set adapter.top_k=2 --set adapter.router_aux_loss_coef=0.01"
bench="./build-gpu/lorafit bench --shape llama-1b --seq 2048 --batch 4 --steps 12 --warmup 3 --device cuda --json"
results="$out/mixlora.jsonl"
: > "$results"
for ckpt in false true; do
  for adapter in lora mixlora; do
    set_adapter="--set adapter.type=lora"
    [ $adapter = mixlora ] && set_adapter=$moe
    r=$($bench --set train.gradient_checkpointing=$ckpt $set_adapter 2>> "$out/mixlora-bench.log" || echo '{}')
    echo "{\"ckpt\": $ckpt, \"adapter\": \"$adapter\", \"r\": $r}" >> "$results"
  done
done
python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
lora = {r["ckpt"]: r["r"].get("tokens_per_s", 0) for r in rows if r["adapter"] == "lora"}
print(f"{'llama-1b 2048x4':18s} {'adapter':8s} {'tokens/s':>9s} {'x LoRA':>7s} {'GiB':>6s} {'MFU':>6s}")
for r in rows:
    o, ref = r["r"], lora.get(r["ckpt"], 0)
    t = o.get("tokens_per_s", 0)
    print(f"{'ckpt' if r['ckpt'] else 'no ckpt':18s} {r['adapter']:8s} {t:9.0f} "
          f"{t / ref if ref else 0:7.2f} {o.get('peak_mem_gib', 0):6.2f} {o.get('mfu', 0):6.3f}")
PY
./build-gpu/lorafit bench --shape llama-1b --seq 2048 --batch 4 --steps 3 --warmup 2 --device cuda \
  $moe --profile /tmp/lorafit-mixlora-profile.json > /dev/null 2>> "$out/mixlora-bench.log" &&
  python3 scripts/profile_summary.py /tmp/lorafit-mixlora-profile.json --steps 3 --top 12
