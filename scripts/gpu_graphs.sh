#!/usr/bin/env bash
# train.cuda_graphs in one GPU call (about 5 minutes): builds lorafit and the GPU tests
# (build-gpu/), runs the [gpu][graphs] test (a run replayed from graphs against the same run
# executed eagerly: losses, adapters), then `lorafit bench` eagerly and with graphs on each of
# ROWS (shape:seq:batch:jobs:checkpointing) and prints tokens/s, the share of timed passes
# replayed, peak memory and the ratio. TESTS=0 skips the test; TEST_TAGS picks others.
# Needs .gpu-deps.   bash scripts/gpu_graphs.sh
set -uo pipefail
source scripts/gpu_common.sh
rows="${ROWS:-llama-1b:512:4:1:0 llama-1b:512:4:4:0 llama-1b:2048:4:1:0 llama-1b:2048:2:4:0 llama-1b:8192:1:1:1 llama2-7b:2048:2:1:0}"
gpu_build graphs lorafit lorafit_gpu_tests
if ((${TESTS:-1})); then
  tags="${TEST_TAGS:-[graphs]}"
  ./build-gpu/lorafit_gpu_tests "$tags" > "$out/graphs-tests.log" 2>&1
  echo "gpu tests $tags: exit $? $(tail -2 "$out/graphs-tests.log" | tr -s '\n' ' ')"
  grep -h -A1 "warning:" "$out/graphs-tests.log" | grep -h "largest" | sort | uniq -c
fi
results="$out/graphs.jsonl"
: > "$results"
for row in $rows; do
  IFS=: read -r shape seq batch jobs ckpt <<< "$row"
  for graphs in false true; do
    r=$(./build-gpu/lorafit bench --shape "$shape" --seq "$seq" --batch "$batch" --jobs "$jobs" \
          --device cuda --json --set train.cuda_graphs=$graphs \
          --set train.gradient_checkpointing=$([ "$ckpt" = 1 ] && echo true || echo false) \
          2>> "$out/graphs-bench.log" || echo '{}')
    echo "{\"row\": \"$row\", \"graphs\": $graphs, \"r\": $r}" >> "$results"
  done
done
python3 - "$results" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    x = json.loads(line)
    rows.setdefault(x["row"], {})[x["graphs"]] = x["r"]
print("GiB: peak of tensors / peak the allocator held")
print(f"{'shape:seq:batch:jobs:ckpt':28s} {'eager tok/s':>11s} {'GiB':>11s} | {'graphs tok/s':>12s} {'GiB':>11s} {'replayed':>8s} | {'x':>5s}")
def gib(r):
    return f"{r.get('peak_mem_gib', 0):5.2f}/{r.get('peak_reserved_gib', 0):5.2f}"
for row, r in rows.items():
    e, g = r.get(False, {}), r.get(True, {})
    te, tg = e.get("tokens_per_s", 0), g.get("tokens_per_s", 0)
    print(f"{row:28s} {te:11.0f} {gib(e):>11s} | {tg:12.0f} {gib(g):>11s} "
          f"{100 * g.get('graphed', 0):7.0f}% | {tg / te if te else float('nan'):5.2f}")
PY
