#!/usr/bin/env python3
"""Data and base-model config for the multi-task experiment (docs/experiments/multitask.md).

Writes into OUT (default runs/multitask/data):
  base/config.json, base/tokenizer.model   a small LLaMA (4 layers, hidden 128) with the tiny
                                           fixture's tokenizer, for `lorafit init --from`
  pretrain.jsonl, pretrain_valid.jsonl     what the base learns first: copy and rotate a
                                           digit string (chat format)
  train.jsonl                              the fine-tuning mixture: three tasks the base never
                                           saw, shuffled together
  valid_{reverse,sort,increment}.jsonl     held-out records of each task, scored by exact match
  valid.jsonl                              100 of each, for the eval loss during training

Every task works on strings of 5 to 8 digits, which the tokenizer reads one token per digit:
  reverse 48213 -> 31284      sort 48213 -> 12348      increment 48213 -> 59324 (each digit + 1
  mod 10). Deterministic; no third-party packages.

    python3 scripts/make_multitask_data.py [OUT]
"""
import os
import random
import sys

from experiment_data import ROOT, small_llama, write_jsonl

BASE_TASKS = {
    "copy": lambda s: s,
    "rotate": lambda s: s[1:] + s[0],
}
TASKS = {
    "reverse": lambda s: s[::-1],
    "sort": lambda s: "".join(sorted(s)),
    "increment": lambda s: "".join(str((int(c) + 1) % 10) for c in s),
}


def record(task, fn, rng):
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(5, 8)))
    return {"messages": [{"role": "user", "content": f"{task} {digits}"},
                         {"role": "assistant", "content": fn(digits)}]}


def main(out):
    small_llama(os.path.join(out, "base"), "gqa_llama3")

    rng = random.Random(0)
    pretrain = [record(t, fn, rng) for t, fn in BASE_TASKS.items() for _ in range(4000)]
    rng.shuffle(pretrain)
    write_jsonl(os.path.join(out, "pretrain.jsonl"), pretrain[:-200])
    write_jsonl(os.path.join(out, "pretrain_valid.jsonl"), pretrain[-200:])

    seen = set()
    train = []
    for task, fn in TASKS.items():
        for _ in range(3000):
            r = record(task, fn, rng)
            seen.add(r["messages"][0]["content"])
            train.append(r)
    rng.shuffle(train)
    write_jsonl(os.path.join(out, "train.jsonl"), train)
    mixed_valid = []
    for task, fn in TASKS.items():
        valid = []
        while len(valid) < 300:
            r = record(task, fn, rng)
            if r["messages"][0]["content"] not in seen:  # held out: never trained on
                valid.append(r)
        write_jsonl(os.path.join(out, f"valid_{task}.jsonl"), valid)
        mixed_valid.extend(valid[:100])
    write_jsonl(os.path.join(out, "valid.jsonl"), mixed_valid)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "runs", "multitask", "data"))
