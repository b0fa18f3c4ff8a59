#!/usr/bin/env python3
"""An independent reference for recipes/models/stories260k: llama2.c's own run.c.

    python3 scripts/stories260k_reference.py LLAMA2C_DIR

Converts the Hugging Face folder back to llama2.c's checkpoint format (undoing the q/k row
permutation that the HF conversion applied, so a mistake there shows), builds run.c with a small
driver (scripts/stories260k_reference.c) and writes tests/fixtures/stories260k/expected.json: the
mean next-token loss of a story as `lorafit eval` scores it (every position after the first) and
run.c's greedy continuation of a prompt, both on token ids that `lorafit tokenize` gives (the
model's sentencepiece). Needs only python3, gcc and a built ./build/lorafit; LLAMA2C_DIR is a
checkout of github.com/karpathy/llama2.c (run.c).
"""
import json
import os
import struct
import subprocess
import sys
import tempfile
from array import array

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "recipes/models/stories260k")
STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the "
         "park. One day, she saw a big red ball under a tree. She ran to get it and smiled.")
PROMPT = "Once upon a time, there was a little dog"
STEPS = 40


def read_safetensors(path):
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", name
        a, b = info["data_offsets"]
        out[name] = (info["shape"], array("f", data[8 + n + a:8 + n + b]))
    return out


def unpermute(values, rows, cols, heads):
    # HF rows per head: [first halves of the pairs..., second halves...]; llama2.c interleaves.
    head_dim = rows // heads
    half = head_dim // 2
    out = array("f", [0.0]) * (rows * cols)
    for h in range(heads):
        for i in range(half):
            for part in range(2):
                src = (h * head_dim + part * half + i) * cols
                dst = (h * head_dim + 2 * i + part) * cols
                out[dst:dst + cols] = values[src:src + cols]
    return out


def write_bin(path):
    cfg = json.load(open(os.path.join(MODEL, "config.json")))
    t = read_safetensors(os.path.join(MODEL, "model.safetensors"))
    dim, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = dim // heads
    with open(path, "wb") as f:
        f.write(struct.pack("7i", dim, cfg["intermediate_size"], layers, heads, kv,
                            cfg["vocab_size"], cfg["max_position_embeddings"]))
        t["model.embed_tokens.weight"][1].tofile(f)
        layer = lambda i, n: t[f"model.layers.{i}.{n}.weight"][1]
        for i in range(layers):
            layer(i, "input_layernorm").tofile(f)
        for i in range(layers):
            unpermute(layer(i, "self_attn.q_proj"), heads * head_dim, dim, heads).tofile(f)
        for i in range(layers):
            unpermute(layer(i, "self_attn.k_proj"), kv * head_dim, dim, kv).tofile(f)
        for name in ("self_attn.v_proj", "self_attn.o_proj", "post_attention_layernorm",
                     "mlp.gate_proj", "mlp.down_proj", "mlp.up_proj"):
            for i in range(layers):
                layer(i, name).tofile(f)
        t["model.norm.weight"][1].tofile(f)
        # the freq_cis tables run.c skips
        array("f", [0.0] * (cfg["max_position_embeddings"] * head_dim)).tofile(f)


def tokenize(text):
    out = subprocess.run([os.path.join(ROOT, "build/lorafit"), "tokenize", "--json", "--model",
                          MODEL], input=json.dumps({"text": text}), capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out)["ids"]


def main():
    llama2c = sys.argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "stories260K.bin")
        write_bin(ckpt)
        exe = os.path.join(tmp, "reference")
        subprocess.run(["gcc", "-O2", "-I", llama2c, "-o", exe,
                        os.path.join(ROOT, "scripts/stories260k_reference.c"), "-lm"], check=True)
        story, prompt = tokenize(STORY), tokenize(PROMPT)
        args = [exe, ckpt, str(STEPS), str(len(prompt))] + [str(i) for i in prompt + story]
        result = json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout)
    expected = {"story": STORY, "story_ids": story, "loss": result["loss"],
                "tokens": result["tokens"], "prompt": PROMPT, "prompt_ids": prompt,
                "greedy_ids": result["greedy"]}
    os.makedirs(os.path.join(ROOT, "tests/fixtures/stories260k"), exist_ok=True)
    with open(os.path.join(ROOT, "tests/fixtures/stories260k/expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    print(json.dumps({k: expected[k] for k in ("loss", "tokens", "greedy_ids")}))


if __name__ == "__main__":
    main()
