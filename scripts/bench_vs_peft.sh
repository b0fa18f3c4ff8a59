#!/usr/bin/env bash
# Issue 4's table in one GPU call: builds lorafit (build-gpu/, incremental), then runs lorafit
# bench and PEFT + transformers (eager, and under torch.compile for the rows COMPILED lists:
# all by default) on the same shapes, and prints the ratios. Needs .gpu-deps. The five rows
# with compiled PEFT take about 17 minutes (the 7B and 8B compiles warm up for 2.5 min a row):
# over one call's 10-minute limit. PREBUILT=1 skips the build (gpu_common.sh), and with it the
# five rows fit two calls:
#   PREBUILT=1 KEEPS=attention,residual ROWS="llama-1b:2048:4:0 llama-1b:8192:1:1 llama2-7b:2048:2:0" bash scripts/bench_vs_peft.sh
#   PREBUILT=1 KEEPS=attention,residual ROWS="llama2-7b:4096:1:1 llama3-8b:4096:1:1" bash scripts/bench_vs_peft.sh
# COMPILED="" skips compiled PEFT (all five rows then fit one call). On checkpointed rows
# lorafit runs once for each value of train.checkpoint_keep in KEEPS (default "none
# attention,residual"; "none" recomputes everything), against the same PEFT runs. "match"
# keeps attention, the residual and gate/up's output in as many layers as fit eager PEFT's peak
# memory on that row: two short probe runs measure lorafit's memory keeping attention and the
# residual, and what one layer's gate/up adds (KEEPS="attention,residual match" compares at
# PEFT's memory). GRAPHS="false true" runs lorafit on each row both eagerly and with
# train.cuda_graphs (default: false).
set -uo pipefail
source scripts/gpu_common.sh
rows="${ROWS:-llama-1b:2048:4:0 llama-1b:8192:1:1 llama2-7b:2048:2:0 llama2-7b:4096:1:1 llama3-8b:4096:1:1}"
compiled="${COMPILED-$rows}"
keeps="${KEEPS-none attention,residual}"
graph_modes="${GRAPHS:-false}"
gpu_build bench lorafit
# match_peft_memory SHAPE SEQ BATCH PEFT_JSON: the checkpoint_keep list for "match".
match_peft_memory() {
  local probe=(./build-gpu/lorafit bench --shape "$1" --seq "$2" --batch "$3" --device cuda --json
               --steps 1 --warmup 1 --set train.gradient_checkpointing=true)
  local base one
  base=$("${probe[@]}" --set "train.checkpoint_keep=[attention,residual]" 2>> "$out/bench.log") &&
    one=$("${probe[@]}" --set "train.checkpoint_keep=[attention,residual,gate_up:1]" 2>> "$out/bench.log") ||
    return 1
  python3 - "$base" "$one" "$4" <<'PY'
import json, math, sys
base, one, peft = (json.loads(a) for a in sys.argv[1:])
layer = one["peak_mem_gib"] - base["peak_mem_gib"]
n = math.floor((peft["peak_mem_gib"] - base["peak_mem_gib"]) / layer) if layer > 0 and peft else 0
print("attention,residual" + (f",gate_up:{n}" if n > 0 else ""))
PY
}
results="$out/bench.jsonl"
: > "$results"
for row in $rows; do
  IFS=: read -r shape seq batch ckpt <<< "$row"
  eager=$(python3 scripts/peft_bench.py "$shape" "$seq" "$batch" "$ckpt" 0 2>> "$out/bench.log" || echo '{}')
  comp='{}'
  [[ " $compiled " == *" $row "* ]] && comp=$(python3 scripts/peft_bench.py "$shape" "$seq" "$batch" "$ckpt" 1 2>> "$out/bench.log" || echo '{}')
  for keep in $([ "$ckpt" = 1 ] && echo "$keeps" || echo none); do
    if [ "$keep" = match ]; then
      keep=$(match_peft_memory "$shape" "$seq" "$batch" "$eager") || continue
    fi
    for graphs in $graph_modes; do
      sets=(--set train.gradient_checkpointing=$([ "$ckpt" = 1 ] && echo true || echo false))
      [ "$keep" != none ] && sets+=(--set "train.checkpoint_keep=[$keep]")
      sets+=(--set train.cuda_graphs=$graphs)
      ours=$(./build-gpu/lorafit bench --shape "$shape" --seq "$seq" --batch "$batch" --device cuda --json \
             "${sets[@]}" 2>> "$out/bench.log" || echo '{}')
      label=$row$([ "$ckpt" = 1 ] && echo " keep=$keep")$([ "$graphs" = true ] && echo " graphs")
      echo "{\"row\": \"$label\", \"lorafit\": $ours, \"peft\": $eager, \"peft_compiled\": $comp}" >> "$results"
    done
  done
done
python3 - "$results" <<'PY'
import json, sys
print(f"{'row':44s} {'lorafit tok/s':>13s} {'GiB':>6s} {'MFU':>5s} | {'PEFT tok/s':>10s} {'GiB':>6s} {'x':>5s} | {'compiled':>9s} {'GiB':>6s} {'x':>5s}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    o, e, c = r["lorafit"], r["peft"], r["peft_compiled"]
    def ratio(ref):
        return f"{o['tokens_per_s'] / ref['tokens_per_s']:5.2f}" if o and ref else "    -"
    print(f"{r['row']:44s} {o.get('tokens_per_s', 0):13.0f} {o.get('peak_mem_gib', 0):6.1f} {o.get('mfu', 0):5.2f} | "
          f"{e.get('tokens_per_s', 0):10.0f} {e.get('peak_mem_gib', 0):6.1f} {ratio(e)} | "
          f"{c.get('tokens_per_s', 0):9.0f} {c.get('peak_mem_gib', 0):6.1f} {ratio(c)}")
PY
