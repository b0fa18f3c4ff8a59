#!/usr/bin/env bash
# Issue 8's GPU evidence (about 6 minutes): four LoRA jobs on one Llama-3.2-1B shape (bf16,
# random weights), ranks 8/16/32/64 on all seven projections, learning rates 1e-4..5e-4, each
# with its own token data (512-token rows, micro-batches of 4 rows, 8 rows per step), trained
#  - fused: one process, `jobs:` (one base, the four jobs' rows in every forward pass);
#  - one after another: four `lorafit train` runs of the jobs' own resolved recipes;
#  - side by side: the same four runs as four processes at once;
#  - fused, graphs: the fused run with train.cuda_graphs (not with MIXED=1).
# Prints total time (process start to end, model loads included), tokens/s over that time,
# steady tokens/s (the last logged interval: summed over concurrent jobs, averaged over
# sequential ones), peak GPU memory (nvidia-smi: every process, CUDA contexts included) and
# each job's last loss. Also runs the jobs tests on LibTorch 2.x (CPU). MIXED=1 trains four
# adapter types instead (LoRA r=16, DoRA r=16, MultiLoRA 3 x r=8, MixLoRA 8 experts top-2 r=16,
# all at lr 2e-4), the same rows and modes. JOB_TESTS=0 skips the tests.
# Needs .gpu-deps, python3 with transformers and PEFT.   bash scripts/gpu_jobs.sh
set -uo pipefail
source scripts/gpu_common.sh
steps="${STEPS:-40}"
gpu_build jobs lorafit lorafit_unit_tests lorafit_cli_tests
bin=./build-gpu/lorafit

if ((${JOB_TESTS:-1})); then
  echo "== jobs tests on LibTorch $(python3 -c 'import torch;print(torch.__version__)') (CPU)"
  for t in unit cli; do
    ./build-gpu/lorafit_${t}_tests "[jobs]" > "$out/jobs-$t-tests.log" 2>&1
    echo "$t: exit $? $(tail -2 "$out/jobs-$t-tests.log" | tr -s '\n' ' ')"
  done
fi

work=/tmp/lorafit-jobs
rm -rf "$work" && mkdir -p "$work"
python3 scripts/peft_reference.py make-1b "$work/1b" > /dev/null 2>&1
cp tests/fixtures/gqa_llama3/model/tokenizer.model "$work/1b/model/"
python3 - "$work" <<'PY'
import json, sys, torch
for j in range(4):
    g = torch.Generator().manual_seed(10 + j)
    with open(f"{sys.argv[1]}/job{j}.jsonl", "w") as f:
        for _ in range(256):  # rows repeating a random motif
            motif = torch.randint(3, 32000, (32,), generator=g)
            f.write(json.dumps({"input_ids": motif.repeat(16).tolist()}) + "\n")
PY
cat > "$work/jobs.yaml" <<YAML
model: $work/1b/model
output: $work/fused
device: cuda
dtype: bf16
data: {format: tokens, max_seq_len: 512, packing: false}
adapter: {type: lora, alpha: 32, dropout: 0.0, targets: all-linear}
train: {steps: $steps, batch_size: 8, micro_batch_size: 4, warmup_steps: 5, log_every: 10,
        eval_every: 0, save_every: 0}
jobs:
YAML
if ((${MIXED:-0})); then
  cat >> "$work/jobs.yaml" <<YAML
  - {name: lora, adapter: {r: 16}, data: {train: $work/job0.jsonl}, train: {lr: 2.0e-4}}
  - {name: dora, adapter: {type: dora, r: 16}, data: {train: $work/job1.jsonl}, train: {lr: 2.0e-4}}
  - {name: multilora, adapter: {type: multilora, r: 8, n: 3}, data: {train: $work/job2.jsonl},
     train: {lr: 2.0e-4}}
  - {name: mixlora, adapter: {type: mixlora, r: 16, num_experts: 8, top_k: 2, router_aux_loss_coef: 0.01},
     data: {train: $work/job3.jsonl}, train: {lr: 2.0e-4}}
YAML
  jobs=(lora dora multilora mixlora)
else
  cat >> "$work/jobs.yaml" <<YAML
  - {name: r8,  adapter: {r: 8},  data: {train: $work/job0.jsonl}, train: {lr: 1.0e-4}}
  - {name: r16, adapter: {r: 16}, data: {train: $work/job1.jsonl}, train: {lr: 2.0e-4}}
  - {name: r32, adapter: {r: 32}, data: {train: $work/job2.jsonl}, train: {lr: 3.0e-4}}
  - {name: r64, adapter: {r: 64}, data: {train: $work/job3.jsonl}, train: {lr: 5.0e-4}}
YAML
  jobs=(r8 r16 r32 r64)
fi

# Runs "$@" while sampling the GPU's used memory; prints "seconds peak_MiB".
measure() {
  local samples="$out/jobs-mem-$1.txt"
  shift
  local idle
  idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$samples" &
  local poll=$!
  local t0 t1
  t0=$(date +%s.%N)
  "$@"
  t1=$(date +%s.%N)
  kill $poll 2> /dev/null
  wait $poll 2> /dev/null
  python3 -c "import sys; m=[int(l) for l in open('$samples') if l.strip().isdigit()]; print(f'{$t1-$t0:.2f} {max(m)-$idle}')"
}
fused() { $bin train "$work/jobs.yaml" 2> "$out/jobs-fused.log"; }
# The fused run replaying its passes from CUDA graphs (MixLoRA, which routes on host counts,
# refuses them: no such row for MIXED=1).
fused_graphs() {
  $bin train "$work/jobs.yaml" --set train.cuda_graphs=true --set output="$work/graphs" \
    2> "$out/jobs-graphs.log"
}
sequential() {
  for j in "${jobs[@]}"; do
    $bin train "$work/fused/$j/recipe.yaml" --set output="$work/seq/$j" 2> "$out/jobs-seq-$j.log"
  done
}
side_by_side() {
  local pids=()
  for j in "${jobs[@]}"; do
    $bin train "$work/fused/$j/recipe.yaml" --set output="$work/side/$j" 2> "$out/jobs-side-$j.log" &
    pids+=($!)
  done
  local ok=0
  for p in "${pids[@]}"; do wait "$p" || ok=1; done
  return $ok
}
echo "== one LoRA job (r=16) on the same shape: lorafit bench, 512 x 4 and 512 x 16"
for batch in 4 16; do
  $bin bench --shape llama-1b --seq 512 --batch $batch --device cuda --json 2> /dev/null |
    python3 -c "import json,sys; r=json.load(sys.stdin); print(f'512 x $batch: {r[\"tokens_per_s\"]:.0f} tok/s, {r[\"peak_mem_gib\"]:.1f} GiB')"
done
echo "== four LoRA jobs, ${steps} steps each, Llama-3.2-1B shape, bf16"
f=$(measure fused fused) || true
s=$(measure seq sequential) || true
b=$(measure side side_by_side) || true
g=""
((${MIXED:-0})) || g=$(measure graphs fused_graphs) || true
python3 - "$work" "$steps" "$f" "$s" "$b" "${jobs[*]}" "$g" <<'PY'
import json, os, sys
work, steps = sys.argv[1], int(sys.argv[2])
jobs = sys.argv[6].split()
tokens = len(jobs) * steps * 8 * 512
def last(path, key):
    rows = [json.loads(l) for l in open(path) if f'"{key}"' in l] if os.path.exists(path) else []
    return rows[-1][key] if rows else float("nan")
rows = []
for mode, folder, m, concurrent in (("fused", "fused", sys.argv[3], True),
                                    ("one after other", "seq", sys.argv[4], False),
                                    ("side by side", "side", sys.argv[5], True),
                                    ("fused, graphs", "graphs", sys.argv[7], True)):
    if mode == "fused, graphs" and not m.strip():
        continue
    secs, mib = (float(x) for x in m.split()) if m.strip() else (float("nan"), float("nan"))
    rates = [last(f"{work}/{folder}/{j}/metrics.jsonl", "tokens_per_s") for j in jobs]
    steady = sum(rates) if concurrent else sum(rates) / len(rates)
    done = all(os.path.exists(f"{work}/{folder}/{j}/adapter/adapter_model.safetensors") for j in jobs)
    losses = " ".join(f"{last(f'{work}/{folder}/{j}/metrics.jsonl', 'loss'):.3f}" for j in jobs)
    rows.append((mode, secs, tokens / secs if done else 0.0, steady, mib / 1024, losses, done))
seq = rows[1][2]
print(f"{'mode':16s} {'total s':>8s} {'tok/s':>8s} {'vs seq':>7s} {'steady tok/s':>13s} {'peak GiB':>9s}   last loss per job")
for mode, secs, rate, steady, gib, losses, done in rows:
    ratio = rate / seq if seq else float("nan")
    print(f"{mode:16s} {secs:8.1f} {rate:8.0f} {ratio:7.2f} {steady:13.0f} {gib:9.1f}   {losses}"
          + ("" if done else "   (did not finish: see jobs-*.log)"))
PY
