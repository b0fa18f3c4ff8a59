#!/usr/bin/env python3
"""PEFT + transformers training-step throughput, as scripts/bench_vs_peft.sh compares it with
`lorafit bench`: LoRA r=16, alpha 32, dropout 0 on q,k,v,o,gate,up,down; bf16 random weights;
sdpa attention; torch.optim.AdamW(fused=True); tokens/s over 10 steps after the warm-up; peak
torch.cuda.max_memory_allocated.

    peft_bench.py SHAPE SEQ BATCH CHECKPOINTING(0|1) COMPILE(0|1) [lora|dora]   -> one JSON line

dora: the same LoRA with use_dora=True (PEFT's DoRA).

With PEFT_PROFILE=FILE, two more steps are recorded by torch.profiler as a Chrome trace.
"""
import json
import os
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                     vocab_size=128256, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
}


def lora_model(shape, ckpt=False, adapter="lora"):
    """A shape's random bf16 model on CUDA with PEFT's LoRA (or DoRA) on the seven projections,
    in training mode, and its fused AdamW: (model, config, optimizer)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=131072, rms_norm_eps=1e-5, **SHAPES[shape])
    cfg._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM", use_dora=adapter == "dora",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, cfg, torch.optim.AdamW(params, lr=1e-4, fused=True)


def timed_steps(step, steps, warmup=3):
    """Runs `warmup` steps, resets the peak memory, then times `steps` more:
    (their results, seconds, warm-up seconds)."""
    start = time.time()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    warmup_s = time.time() - start
    torch.cuda.reset_peak_memory_stats()
    start = time.time()
    results = [step() for _ in range(steps)]
    torch.cuda.synchronize()
    return results, time.time() - start, warmup_s


def main(shape, seq, batch, ckpt, compile_, adapter="lora"):
    model, cfg, opt = lora_model(shape, ckpt, adapter)
    run = torch.compile(model) if compile_ else model
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")

    def step():
        loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    results, secs, warmup_s = timed_steps(step, 10)
    loss = results[-1]
    if os.environ.get("PEFT_PROFILE"):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                step()
            torch.cuda.synchronize()
        prof.export_chrome_trace(os.environ["PEFT_PROFILE"])
    print(json.dumps({"tokens_per_s": 10 * batch * seq / secs, "step_ms": secs * 100,
                      "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                      "loss": loss.item(), "warmup_s": warmup_s}))


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], int(a[1]), int(a[2]), a[3] == "1", a[4] == "1", *a[5:6])
