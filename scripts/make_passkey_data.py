#!/usr/bin/env python3
"""Data and base-model config for the passkey experiment (docs/experiments/passkey.md).

LongLoRA's passkey test: a five-digit key hidden at a random depth in filler text, asked for
at the end. Writes into OUT (default runs/passkey/data), in LLaMA-2 chat format:
  base/config.json, base/tokenizer.model   a small LLaMA (4 layers, hidden 128) that knows
                                           128 positions, with the tiny fixture's tokenizer
  short_train.jsonl, short_valid.jsonl     a filler sentence and the key (about 100 tokens):
                                           the base learns retrieval at its own length
  long_train.jsonl, long_valid.jsonl       10 filler sentences and the key (about 420
                                           tokens of 512, 4x): the extension's data and test
Held-out keys never occur in training. Deterministic; no third-party packages.

    python3 scripts/make_passkey_data.py [OUT]
"""
import json
import os
import random
import shutil
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SUBJECTS = ["the cat", "the dog", "a bird", "the baker", "the children", "the old mill"]
VERBS = {"the cat": "sat on the mat", "the dog": "ran far away", "a bird": "sang a sweet song",
         "the baker": "made fresh bread", "the children": "played in the park",
         "the old mill": "stood by the river"}
TIMES = ["every morning", "until dark", "in the rain", "over the hill", "at sun rise"]


def filler(rng):
    s = rng.choice(SUBJECTS)
    return f"{s.capitalize()} {VERBS[s]} {rng.choice(TIMES)}."


def record(rng, sentences, used, fresh):
    while True:
        key = f"{rng.randrange(100000):05d}"
        if not fresh or key not in used:
            break
    used.add(key)
    text = [filler(rng) for _ in range(sentences)]
    text.insert(rng.randint(0, sentences), f"The pass key is {key}. Remember it.")
    return {"messages": [
        {"role": "user", "content": " ".join(text) + " What is the pass key?"},
        {"role": "assistant", "content": key}]}


def write(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def main(out):
    os.makedirs(os.path.join(out, "base"), exist_ok=True)
    fixture = os.path.join(ROOT, "tests", "fixtures", "gqa_llama3", "model")
    with open(os.path.join(ROOT, "tests", "fixtures", "trained_tiny", "model", "config.json")) as f:
        config = json.load(f)  # plain RoPE, which linear interpolation extends
    config.update(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  max_position_embeddings=128)
    with open(os.path.join(out, "base", "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    shutil.copy(os.path.join(fixture, "tokenizer.model"), os.path.join(out, "base"))
    rng = random.Random(0)
    used = set()
    write(os.path.join(out, "short_train.jsonl"), [record(rng, 1, used, False) for _ in range(8000)])
    write(os.path.join(out, "long_train.jsonl"), [record(rng, 10, used, False) for _ in range(4000)])
    write(os.path.join(out, "short_valid.jsonl"), [record(rng, 1, used, True) for _ in range(300)])
    write(os.path.join(out, "long_valid.jsonl"), [record(rng, 10, used, True) for _ in range(300)])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "runs", "passkey", "data"))
