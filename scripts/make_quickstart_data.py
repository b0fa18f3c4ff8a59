#!/usr/bin/env python3
"""Writes recipes/data/tiny_{train,valid}.jsonl: short sentences from a small grammar, in the
vocabulary that tests/fixtures' tiny tokenizer was trained on, so a LoRA on the tiny model
visibly learns them. Deterministic; no third-party packages.

    python3 scripts/make_quickstart_data.py
"""
import json
import os
import random

SUBJECTS = ["the cat", "the dog", "a bird", "the baker", "the children", "the old mill"]
VERBS = {"the cat": "sat on the mat", "the dog": "ran far away", "a bird": "sang a sweet song",
         "the baker": "made fresh bread", "the children": "played in the park",
         "the old mill": "stood by the river"}
TIMES = ["every morning", "until dark", "in the rain", "over the hill", "at sun rise"]


def sentence(rng):
    s = rng.choice(SUBJECTS)
    return f"{s.capitalize()} {VERBS[s]} {rng.choice(TIMES)}."


def write(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            text = " ".join(sentence(rng) for _ in range(rng.randint(1, 3)))
            f.write(json.dumps({"text": text}) + "\n")


if __name__ == "__main__":
    root = os.path.join(os.path.dirname(__file__), "..", "recipes", "data")
    write(os.path.join(root, "tiny_train.jsonl"), 400, seed=1)
    write(os.path.join(root, "tiny_valid.jsonl"), 40, seed=2)
