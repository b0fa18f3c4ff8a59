#!/usr/bin/env python3
"""Writes a Llama-3.2-1B-shaped checkpoint (random weights, bf16) with transformers, and the
logits transformers computes for it on CUDA in bf16 and in fp32, for tests/gpu.

    python3 scripts/gpu_reference.py OUT_DIR      # OUT_DIR/model, OUT_DIR/reference.safetensors
"""
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

LLAMA_32_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
    max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=128000,
    eos_token_id=128001,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192})


def main():
    out = sys.argv[1]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA_32_1B)).to(torch.bfloat16)
    model.save_pretrained(os.path.join(out, "model"))
    del model
    model_dir = os.path.join(out, "model")
    ids = torch.randint(0, LLAMA_32_1B["vocab_size"], (2, 1024),
                        generator=torch.Generator().manual_seed(1))
    positions = torch.arange(0, 1024, 32)
    tensors = {"input_ids": ids, "positions": positions}
    for name, dtype in (("logits_bf16", torch.bfloat16), ("logits_f32", torch.float32)):
        m = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                             attn_implementation="sdpa").cuda().eval()
        with torch.no_grad():
            tensors[name] = m(ids.cuda()).logits[:, positions].float().cpu().contiguous()
        del m
        torch.cuda.empty_cache()
    save_file(tensors, os.path.join(out, "reference.safetensors"))


if __name__ == "__main__":
    main()
