"""transformers' side of scripts/gpu_tokenizer_check.sh: a tiny Llama-3.2-shaped model (llama3
RoPE scaling, tied embeddings, random weights) with the real Llama-3.1 tokenizer files, and
for it and the real Qwen3 tokenizer AutoTokenizer's ids of a corpus and the model's eval loss
as `lorafit eval` defines it (each record tokenized as tokenizer(text) does, cut to
--max-seq-len, every position after the first scored, the mean over all scored tokens).

usage: python3 scripts/gpu_tokenizer_check.py TOKENIZERS_DIR WORK_DIR
"""
import json
import os
import shutil
import sys

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

src, work = sys.argv[1], sys.argv[2]
os.makedirs(work, exist_ok=True)
corpus = [json.loads(l)["text"] for l in open(os.path.join(work, "corpus.jsonl"))]
max_len = 64

model_dir = os.path.join(work, "llama3")
torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=131072,
    rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000,
    eos_token_id=[128001, 128008, 128009],
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
model = LlamaForCausalLM(config).eval()
with torch.no_grad():  # weights large enough that the loss depends on them
    for p in model.parameters():
        if p.dim() == 2:
            p.normal_(0, 0.2)
model.save_pretrained(model_dir, safe_serialization=True)
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(src, "llama3_1", f), model_dir)

out = {}
for name, folder in (("llama3_1", model_dir), ("qwen3", os.path.join(src, "qwen3"))):
    tok = AutoTokenizer.from_pretrained(folder)
    out[name] = {"ids": [tok(t)["input_ids"] for t in corpus],
                 "eos": tok.eos_token_id}

nll, count = 0.0, 0
with torch.no_grad():
    for ids in out["llama3_1"]["ids"]:
        ids = ids[:max_len]
        if len(ids) < 2:
            continue
        logits = model(torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        target = torch.tensor(ids[1:])
        nll -= logp[:-1].gather(1, target[:, None]).sum().item()
        count += len(ids) - 1
out["llama3_1"]["loss"] = nll / count
out["llama3_1"]["tokens"] = count
json.dump(out, open(os.path.join(work, "reference.json"), "w"))
print("transformers:", out["llama3_1"]["loss"], count, "tokens")
