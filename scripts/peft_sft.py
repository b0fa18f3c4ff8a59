#!/usr/bin/env python3
"""PEFT + transformers on instruction records, padded as the usual HF collator pads them
(each batch to its longest record, labels -100 there, an attention mask), for
scripts/gpu_packing.sh to compare with lorafit's packed rows: peft_bench.py's model (random
bf16 weights of a shape, LoRA r=16, alpha 32, dropout 0 on the seven projections, sdpa
attention, torch.optim.AdamW(fused=True)); real (unpadded) tokens/s over the timed steps, the padding
fraction and peak torch.cuda.max_memory_allocated.

    peft_sft.py SHAPE DATA.jsonl BATCH COMPILE(0|1) [STEPS] [PAD_MULTIPLE]   -> one JSON line

DATA holds {"input_ids", "labels"} records (scripts/gpu_packing.sh writes them); batches of
BATCH records in a seeded shuffled order. COMPILE=1 wraps the model in torch.compile
(dynamic shapes, as every batch has its own length). PAD_MULTIPLE pads each batch up to a
multiple of it, as the collators' pad_to_multiple_of does, so that a compiled model meets
fewer lengths.
"""
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peft_bench import lora_model, timed_steps  # noqa: E402


def batches(records, batch, multiple, seed=0):
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    for start in range(0, len(order) - batch + 1, batch):
        rows = [records[i] for i in order[start:start + batch]]
        longest = max(len(r["input_ids"]) for r in rows)
        longest = -(-longest // multiple) * multiple
        ids = torch.zeros(batch, longest, dtype=torch.long)
        labels = torch.full((batch, longest), -100, dtype=torch.long)
        mask = torch.zeros(batch, longest, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        yield ids.cuda(), labels.cuda(), mask.cuda()


def main(shape, data, batch, compile_, steps=15, multiple=1):
    model, _, opt = lora_model(shape)
    run = torch.compile(model, dynamic=True) if compile_ else model
    records = [json.loads(line) for line in open(data) if line.strip()]
    stream = batches(records, batch, multiple)

    started = time.time()

    def step():
        ids, labels, mask = next(stream)
        loss = run(input_ids=ids, labels=labels, attention_mask=mask).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        # Where a compiled run's time goes (its warm-up recompiles for new lengths).
        print(f"step of {ids.shape[1]} tokens done at {time.time() - started:.1f} s", file=sys.stderr)
        return loss, int(mask.sum()), mask.numel()

    results, secs, warmup_s = timed_steps(step, steps)
    real, slots = sum(r[1] for r in results), sum(r[2] for r in results)
    print(json.dumps({"tokens_per_s": real / secs, "padding": 1 - real / slots,
                      "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                      "loss": results[-1][0].item(), "warmup_s": warmup_s}))


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], int(a[2]), a[3] == "1", *(int(x) for x in a[4:6]))
