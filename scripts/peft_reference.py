#!/usr/bin/env python3
"""What PEFT and transformers compute, for scripts/gpu_train_check.sh to compare with lorafit.

    peft_reference.py eval MODEL DATA MAX_LEN [ADAPTER]   loss as `lorafit eval` defines it
    peft_reference.py make-1b OUT                         Llama-3.2-1B shape (bf16, random),
                                                          a token dataset, PEFT's initial LoRA
    peft_reference.py train-1b OUT STEPS                  PEFT's losses from that adapter

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


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "eval":
        result = eval_loss(args[0], args[1], int(args[2]), args[3] if len(args) > 3 else None)
    elif cmd == "make-1b":
        result = make_1b(args[0])
    else:
        result = train_1b(args[0], int(args[1]))
    print(json.dumps(result))
