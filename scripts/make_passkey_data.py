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
import os
import random
import sys

from experiment_data import ROOT, small_llama, write_jsonl
from make_quickstart_data import sentence  # the quickstart's filler grammar


def record(rng, sentences, used, fresh):
    while True:
        key = f"{rng.randrange(100000):05d}"
        if not fresh or key not in used:
            break
    used.add(key)
    text = [sentence(rng) for _ in range(sentences)]
    text.insert(rng.randint(0, sentences), f"The pass key is {key}. Remember it.")
    return {"messages": [
        {"role": "user", "content": " ".join(text) + " What is the pass key?"},
        {"role": "assistant", "content": key}]}


def main(out):
    small_llama(os.path.join(out, "base"), "trained_tiny")  # plain RoPE, which PI extends
    rng = random.Random(0)
    used = set()
    write_jsonl(os.path.join(out, "short_train.jsonl"), [record(rng, 1, used, False) for _ in range(8000)])
    write_jsonl(os.path.join(out, "long_train.jsonl"), [record(rng, 10, used, False) for _ in range(4000)])
    write_jsonl(os.path.join(out, "short_valid.jsonl"), [record(rng, 1, used, True) for _ in range(300)])
    write_jsonl(os.path.join(out, "long_valid.jsonl"), [record(rng, 10, used, True) for _ in range(300)])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "runs", "passkey", "data"))
