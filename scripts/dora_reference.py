#!/usr/bin/env python3
"""PEFT's DoRA (LoraConfig(use_dora=True)) as the reference for lorafit's `adapter.type: dora`.
Run where torch, transformers and peft are installed (the GPU machine's python3).

    dora_reference.py fixtures FIXTURES_DIR   (tests/fixtures, or a copy of it)
        Beside the committed gqa_llama3 and mha_linear cases, writes PEFT DoRA adapters with
        non-zero B and moved magnitudes (gqa_llama3/dora_all: all seven projections;
        mha_linear/dora_rslora: q and v with rsLoRA) and adds to each case's expected.json
        PEFT's eval loss unmerged ("dora_all") and after merge_and_unload ("dora_all_merged"),
        in fp32 on the CPU.

scripts/peft_reference.py eval scores an adapter that lorafit trained (scripts/gpu_dora.sh).
"""
import json
import os
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from make_reference_fixtures import eval_loss  # scored as the committed fixtures are

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_base(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def make_dora(case_dir, name, config, seed):
    model_dir = os.path.join(case_dir, "model")
    with open(os.path.join(case_dir, "expected.json")) as f:
        expected = json.load(f)
    seqs = expected["token_ids"]
    peft_model = get_peft_model(load_base(model_dir), config)
    g = torch.Generator().manual_seed(seed)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:  # PEFT's B = 0 would make the update a no-op
            p.data = 0.2 * torch.randn(p.shape, generator=g)
        if "lora_magnitude_vector" in n:  # as training moves them away from ||W||
            p.data = p.data * (1 + 0.2 * torch.randn(p.shape, generator=g))
    ad_dir = os.path.join(case_dir, name)
    peft_model.save_pretrained(ad_dir)
    cfg_path = os.path.join(ad_dir, "adapter_config.json")
    with open(cfg_path) as f:
        acfg = json.load(f)
    acfg["base_model_name_or_path"] = os.path.basename(case_dir)
    with open(cfg_path, "w") as f:
        json.dump(acfg, f, indent=2, sort_keys=True)
    for f in os.listdir(ad_dir):
        if f == "README.md":
            os.remove(os.path.join(ad_dir, f))

    loaded = PeftModel.from_pretrained(load_base(model_dir), ad_dir).eval()
    loss, count = eval_loss(loaded, seqs)
    expected[name] = {"loss": loss, "tokens": count}
    merged = loaded.merge_and_unload()
    loss, count = eval_loss(merged, seqs)
    expected[name + "_merged"] = {"loss": loss, "tokens": count}
    with open(os.path.join(case_dir, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    print(os.path.basename(case_dir), name, json.dumps(
        {k: expected[k] for k in ("base", name, name + "_merged")}))


def main():
    if sys.argv[1] == "fixtures":
        root = sys.argv[2]
        make_dora(os.path.join(root, "gqa_llama3"), "dora_all",
                  LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True,
                             target_modules=SEVEN, task_type="CAUSAL_LM"), seed=21)
        make_dora(os.path.join(root, "mha_linear"), "dora_rslora",
                  LoraConfig(r=8, lora_alpha=4, lora_dropout=0.1, use_dora=True, use_rslora=True,
                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"), seed=22)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
