#!/usr/bin/env bash
# Issue 7 on the GPU machine in one call (about 6 minutes):
#  1. builds lorafit (build-gpu/, incremental);
#  2. PEFT reads a LongLoRA adapter with trained embeddings and norms (modules_to_save, tied
#     head, trained on the CPU in fp32 on trained_tiny) and must get lorafit's eval loss;
#     transformers runs the merge of an adapter trained at twice the model's positions (linear
#     RoPE interpolation in its config.json) and must get lorafit's loss at that length;
#  3. on a Llama-3.2-1B shape (r=8 LoRA on q, k, v, o, checkpointed layers, bf16), tokens/s
#     and peak memory of S2-Attn (group 1/4) against full attention at LENGTHS, until one
#     runs out of memory.
# Needs .gpu-deps, python3 with transformers and PEFT.   bash scripts/gpu_longlora.sh
set -uo pipefail
source scripts/gpu_common.sh
gpu_build longlora lorafit
bin=./build-gpu/lorafit
work=/tmp/lorafit-longlora
rm -rf "$work" && mkdir -p "$work"
model=tests/fixtures/trained_tiny/model
valid=recipes/data/tiny_valid.jsonl

echo "== 2. PEFT and transformers read LongLoRA's outputs"
$bin train recipes/tiny.yaml --device cpu --set model=$model --set output=$work/plus \
  --set train.steps=60 --set longlora.group_ratio=0.25 "--set" "longlora.trainable=[embed, norm]" \
  2> "$out/longlora-plus.log"
$bin train recipes/tiny.yaml --device cpu --set model=$model --set output=$work/pi \
  --set train.steps=60 --set data.max_seq_len=256 --set longlora.group_ratio=0.25 \
  2> "$out/longlora-pi.log"
$bin merge --model $model --adapter $work/pi/adapter --out $work/pi/merged --dtype f32
ours_plus=$($bin eval --device cpu --json --model $model --adapter $work/plus/adapter --data $valid --max-seq-len 128)
peft_plus=$(python3 scripts/peft_reference.py eval $model $valid 128 $work/plus/adapter 2> "$out/longlora-peft.log")
ours_pi=$($bin eval --device cpu --json --model $model --adapter $work/pi/adapter --data $valid --max-seq-len 256)
hf_pi=$(python3 scripts/peft_reference.py eval $work/pi/merged $valid 256 2>> "$out/longlora-peft.log")
python3 - "$ours_plus" "${peft_plus:-null}" "$ours_pi" "${hf_pi:-null}" <<'PY'
import json, sys
ours_plus, peft_plus, ours_pi, hf_pi = (json.loads(a) for a in sys.argv[1:])
for name, ours, ref in (("PEFT + embed/norm modules_to_save", ours_plus, peft_plus),
                        ("transformers + merged linear RoPE x2", ours_pi, hf_pi)):
    if not ref:
        print(f"{name:38s} FAILED to load (see longlora-peft.log)")
        continue
    rel = abs(ours["loss"] - ref["loss"]) / ref["loss"]
    print(f"{name:38s} loss {ref['loss']:.6f}  lorafit {ours['loss']:.6f}  rel diff {rel:.2e}  tokens {ref['tokens']}/{ours['tokens']}")
PY
tail -3 "$out/longlora-peft.log"

echo "== 3. Llama-3.2-1B shape, LoRA r=8 on q,k,v,o, checkpointed, bf16"
lora="--set adapter.r=8 --set adapter.alpha=16 --set adapter.targets=[q_proj,k_proj,v_proj,o_proj] --set train.gradient_checkpointing=true"
printf "%-8s %-14s %10s %8s %6s\n" length attention "tokens/s" "GiB" MFU
for len in ${LENGTHS:-32768 65536 131072}; do
  for attn in s2 full; do
    extra=$([ $attn = s2 ] && echo "--set longlora.group_ratio=0.25" || echo "")
    r=$(timeout 240 $bin bench --shape llama-1b --seq $len --batch 1 --steps 2 --warmup 1 --device cuda --json \
        $lora $extra 2>> "$out/longlora-bench.log" || echo '{}')
    python3 -c "import json,sys; r=json.loads(sys.argv[1]); print(f\"{sys.argv[2]:8s} {sys.argv[3]:14s} {r.get('tokens_per_s',0):10.0f} {r.get('peak_mem_gib',0):8.1f} {r.get('mfu',0):6.2f}\" if r else f\"{sys.argv[2]:8s} {sys.argv[3]:14s}   failed (out of memory?)\")" "$r" $len $attn
  done
done
