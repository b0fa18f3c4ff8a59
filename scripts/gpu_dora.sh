#!/usr/bin/env bash
# DoRA's GPU-machine evidence (issue 17), in two calls of at most 10 minutes:
#   PART=check bash scripts/gpu_dora.sh   builds lorafit (build-gpu/, incremental); trains DoRA
#       on the CPU in fp32; PEFT loads it and must get lorafit's eval loss (1e-4), and
#       transformers lorafit's merged checkpoint; the same adapter evaluated on CUDA (bf16);
#       then `lorafit bench` of LoRA and DoRA on the rows of ROWS.
#   PART=peft bash scripts/gpu_dora.sh    PEFT's LoRA and DoRA (eager) on the same rows, and
#       the table of both parts (the first part's results stay in $OUT/dora-bench.jsonl; pass
#       them back with BENCH=FILE when the machine was restarted in between).
# Needs .gpu-deps, python3 with transformers and PEFT.
set -uo pipefail
source scripts/gpu_common.sh
rows="${ROWS:-llama-1b:2048:4:0 llama-1b:8192:1:1}"
results="$out/dora-bench.jsonl"
[ -n "${BENCH:-}" ] && cp "$BENCH" "$results"

if [ "${PART:-check}" = check ]; then
  gpu_build dora lorafit
  bin=./build-gpu/lorafit
  work=/tmp/lorafit-dora
  rm -rf "$work" && mkdir -p "$work"
  model=tests/fixtures/gqa_llama3/model
  valid=recipes/data/tiny_valid.jsonl
  echo "== PEFT reads a DoRA that lorafit trained on the CPU (fp32)"
  $bin train recipes/tiny.yaml --device cpu --set output=$work/cpu --set adapter.type=dora \
    --set adapter.dropout=0.1 2> "$out/dora-train.log" || { tail -5 "$out/dora-train.log"; exit 1; }
  $bin merge --model $model --adapter $work/cpu/adapter --out $work/merged --dtype f32 2>> "$out/dora-train.log"
  ours=$($bin eval --device cpu --json --model $model --adapter $work/cpu/adapter --data $valid --max-seq-len 64)
  cuda=$($bin eval --device cuda --json --model $model --adapter $work/cpu/adapter --data $valid --max-seq-len 64)
  peft=$(python3 scripts/peft_reference.py eval $model $valid 64 $work/cpu/adapter 2>/dev/null)
  merged=$(python3 scripts/peft_reference.py eval $work/merged $valid 64 2>/dev/null)
  base=$(python3 scripts/peft_reference.py eval $model $valid 64 2>/dev/null)
  python3 - "$ours" "$peft" "$merged" "$cuda" "$base" <<'PY'
import json, sys
ours, peft, merged, cuda, base = (json.loads(a) for a in sys.argv[1:])
for name, ref, tol in (("PEFT + lorafit's DoRA", peft, 1e-4), ("transformers + merged", merged, 1e-4),
                       ("lorafit on CUDA (bf16)", cuda, 2e-2)):
    rel = abs(ours["loss"] - ref["loss"]) / ref["loss"]
    print(f"{name:26s} loss {ref['loss']:.6f}  lorafit (CPU) {ours['loss']:.6f}  rel diff {rel:.2e}  "
          f"tokens {ref['tokens']}/{ours['tokens']}  (base {base['loss']:.4f})")
    assert rel < tol and ref["tokens"] == ours["tokens"]
PY
  echo "== lorafit bench"
  : > "$results"
  for row in $rows; do
    IFS=: read -r shape seq batch ckpt <<< "$row"
    flag=$([ "$ckpt" = 1 ] && echo true || echo false)
    for adapter in lora dora; do
      r=$($bin bench --shape "$shape" --seq "$seq" --batch "$batch" --device cuda --json \
          --set train.gradient_checkpointing=$flag --set adapter.type=$adapter 2>> "$out/dora-bench.log" || echo '{}')
      echo "{\"row\": \"$row\", \"who\": \"lorafit\", \"adapter\": \"$adapter\", \"r\": $r}" >> "$results"
    done
  done
  cat "$results"
  exit 0
fi

for row in $rows; do
  IFS=: read -r shape seq batch ckpt <<< "$row"
  for adapter in lora dora; do
    r=$(python3 scripts/peft_bench.py "$shape" "$seq" "$batch" "$ckpt" 0 $adapter 2>> "$out/dora-bench.log" || echo '{}')
    echo "{\"row\": \"$row\", \"who\": \"peft\", \"adapter\": \"$adapter\", \"r\": $r}" >> "$results"
  done
done
python3 - "$results" <<'PY'
import json, sys
got = {}
for line in open(sys.argv[1]):
    e = json.loads(line)
    got[(e["row"], e["who"], e["adapter"])] = e["r"]
print(f"{'row':22s} {'adapter':7s} {'lorafit tok/s':>13s} {'GiB':>6s} | {'PEFT tok/s':>10s} {'GiB':>6s} | {'x':>5s} | {'x PEFT DoRA':>11s}")
for row in dict.fromkeys(k[0] for k in got):
    for adapter in ("lora", "dora"):
        o, p = got.get((row, "lorafit", adapter), {}), got.get((row, "peft", adapter), {})
        pd = got.get((row, "peft", "dora"), {})
        x = f"{o['tokens_per_s'] / p['tokens_per_s']:5.2f}" if o and p else "    -"
        xd = f"{o['tokens_per_s'] / pd['tokens_per_s']:11.2f}" if o and pd else "          -"
        print(f"{row:22s} {adapter:7s} {o.get('tokens_per_s', 0):13.0f} {o.get('peak_mem_gib', 0):6.1f} | "
              f"{p.get('tokens_per_s', 0):10.0f} {p.get('peak_mem_gib', 0):6.1f} | {x} | {xd}")
PY
