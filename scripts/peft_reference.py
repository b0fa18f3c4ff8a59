#!/usr/bin/env python3
"""What PEFT and transformers compute, for scripts/gpu_train_check.sh to compare with lorafit.

    peft_reference.py eval MODEL DATA MAX_LEN [ADAPTER]   loss as `lorafit eval` defines it
    peft_reference.py make-1b OUT                         Llama-3.2-1B shape (bf16, random),
                                                          a token dataset, PEFT's initial LoRA
    peft_reference.py train-1b OUT STEPS                  PEFT's losses from that adapter
    peft_reference.py train-packed OUT STEPS ROW BATCH    the same, on OUT/records.jsonl packed
                                                          as lorafit packs them, one record
                                                          at a time

Each prints one JSON line.
"""
import json
import math
import os
import shutil
import sys

import sentencepiece as spm
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ, BATCH, LR = 512, 4, 1e-4


@torch.no_grad()
def eval_loss(model_dir, data, max_len, adapter=None):
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    sp = spm.SentencePieceProcessor(model_file=os.path.join(model_dir, "tokenizer.model"))
    total, count = 0.0, 0
    for line in open(data):
        if not line.strip():
            continue
        ids = ([model.config.bos_token_id] + sp.encode(json.loads(line)["text"]))[:max_len]
        if len(ids) < 2:
            continue
        x = torch.tensor([ids])
        logp = torch.log_softmax(model(x).logits.double(), -1)
        total -= logp[0, :-1].gather(-1, x[0, 1:, None]).sum().item()
        count += len(ids) - 1
    return {"loss": total / count, "tokens": count}


def make_1b(out):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                      vocab_size=128256, tie_word_embeddings=True, rms_norm_eps=1e-5,
                      max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                       "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192})
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(os.path.join(out, "model"))
    # Rows that repeat a random motif: a pattern LoRA starts to pick up within 20 steps.
    g = torch.Generator().manual_seed(1)
    with open(os.path.join(out, "tokens.jsonl"), "w") as f:
        for _ in range(BATCH * 40):
            motif = torch.randint(3, 32000, (32,), generator=g)
            f.write(json.dumps({"input_ids": motif.repeat(SEQ // 32).tolist()}) + "\n")
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                            target_modules=SEVEN, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(2)
    for n, p in peft.named_parameters():
        if "lora_B" in n:  # a non-zero B, so the first steps already differ from the base
            p.data = 0.01 * torch.randn(p.shape, generator=g).to(p.dtype)
    peft.save_pretrained(os.path.join(out, "peft_init"))
    return {"made": out}


def train_1b(out, steps):
    base = LlamaForCausalLM.from_pretrained(os.path.join(out, "model"), dtype=torch.bfloat16,
                                            attn_implementation="sdpa").cuda()
    model = PeftModel.from_pretrained(base, os.path.join(out, "peft_init"), is_trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    rows = [json.loads(l)["input_ids"] for l in open(os.path.join(out, "tokens.jsonl"))]
    losses = []
    model.train()
    for step in range(steps):
        batch = torch.tensor(rows[step * BATCH:(step + 1) * BATCH]).cuda()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses}


def pack_rows(records, row_len):
    """lorafit's data.packing: true (pack_records in core/datasets.cpp): records longest first
    (ties in file order), each into the fullest row it fits, ties to the earliest row."""
    order = sorted(range(len(records)), key=lambda i: -len(records[i]["input_ids"]))
    rows, room = [], []
    for i in order:
        n = len(records[i]["input_ids"])
        fits = [r for r, left in enumerate(room) if left >= n]
        if not fits:
            rows.append([])
            room.append(row_len)
            fits = [len(rows) - 1]
        best = min(fits, key=lambda r: (room[r], r))
        rows[best].append(i)
        room[best] -= n
    return rows


def train_packed(out, steps, row_len, batch):
    """PEFT on the rows lorafit trains with packing: true and shuffle: false (BATCH rows a
    step, in order), each record of a row run alone: the step's loss is the mean NLL over all
    its records' targets, as lorafit's."""
    base = LlamaForCausalLM.from_pretrained(os.path.join(out, "model"), dtype=torch.bfloat16,
                                            attn_implementation="sdpa").cuda()
    model = PeftModel.from_pretrained(base, os.path.join(out, "peft_init"), is_trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    records = [json.loads(l) for l in open(os.path.join(out, "records.jsonl"))]
    rows = pack_rows(records, row_len)
    losses = []
    model.train()
    for step in range(steps):
        members = [i for row in rows[step * batch:(step + 1) * batch] for i in row]
        targets = sum(sum(l != -100 for l in records[i]["labels"][1:]) for i in members)
        total = 0.0
        for i in members:
            ids = torch.tensor([records[i]["input_ids"]]).cuda()
            labels = torch.tensor([records[i]["labels"]]).cuda()
            logits = model(input_ids=ids).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:],
                                                    ignore_index=-100, reduction="sum")
            (nll / targets).backward()
            total += nll.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(total / targets)
    return {"losses": losses, "rows": len(rows)}


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "eval":
        result = eval_loss(args[0], args[1], int(args[2]), args[3] if len(args) > 3 else None)
    elif cmd == "make-1b":
        result = make_1b(args[0])
    elif cmd == "train-packed":
        result = train_packed(args[0], int(args[1]), int(args[2]), int(args[3]))
    else:
        result = train_1b(args[0], int(args[1]))
    print(json.dumps(result))
