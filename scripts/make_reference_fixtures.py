#!/usr/bin/env python3
"""Writes the tiny reference fixtures under tests/fixtures/ with transformers and PEFT.

Run where torch, transformers, peft and sentencepiece are installed (the GPU machine's python3):

    python3 scripts/make_reference_fixtures.py OUT_DIR [CASE...]

With CASE names only those cases are written; TOKENIZER=PATH then reuses the committed
fixtures' tokenizer.model instead of training a new one, so that new cases join the old.

OUT_DIR receives, for each case, a Hugging Face model folder (config.json, safetensors,
tokenizer.model), PEFT adapter folders, and `reference.safetensors` + `expected.json` holding
the logits, token ids and losses that transformers and PEFT computed in fp32 on the CPU. The
C++ tests compare lorafit against these numbers; nothing here is hand-written.

Cases (each covers a point of the loader that can silently go wrong):
  gqa_llama3   GQA (4 heads, 2 KV heads), head_dim 16 != hidden/heads, tied embeddings,
               llama3 rope scaling in transformers 5's `rope_parameters` spelling, f32, one file;
               PEFT LoRA on all seven projections with non-zero B (`lora_all`).
  mha_linear   MHA, untied head, linear rope scaling in transformers 4's `rope_theta` +
               `rope_scaling` spelling, bf16 weights in several shards with an index;
               PEFT rsLoRA on q_proj and v_proj only (`lora_rslora`).
  qwen2_bias   Qwen2: biases on q, k and v (none on o), GQA, tied embeddings, bf16 weights;
               PEFT LoRA on q, k, v and o, whose biases stay frozen (`lora_qkvo`).
  qwen3_norm   Qwen3: RMSNorm on each head of q and k, explicit head_dim 16 != hidden/heads,
               untied head; PEFT LoRA on all seven projections (`lora_all`).
  mistral_swa  Mistral: a sliding_window (256) longer than every sequence here, so full
               causal attention is exact; PEFT LoRA on the MLP (`lora_mlp`).
  trained_tiny a tiny LLaMA that transformers trains on the corpus, so that its greedy
               continuations (recorded from transformers' generate) are meaningful text.
"""
import json
import math
import os
import shutil
import sys

import sentencepiece as spm
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

VOCAB = 320
MAX_SEQ_LEN = 24  # eval cut; some records are longer, so truncation is exercised

WORDS = ("the a cat dog sat on mat ran far away bird sang sweet song sun rose over hill river "
         "flowed past old mill children played in park until dark light rain fell upon quiet "
         "town baker made fresh bread every morning 1 2 3 42 2024").split()


def corpus(n, seed):
    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(n):
        k = int(torch.randint(3, 14, (1,), generator=g))
        idx = torch.randint(0, len(WORDS), (k,), generator=g).tolist()
        lines.append(" ".join(WORDS[i] for i in idx).capitalize() + ".")
    return lines


def train_tokenizer(path_prefix):
    # LLaMA-style: BPE, byte fallback, digits split, identity normaliser, dummy prefix,
    # unk=0 bos=1 eos=2, no pad.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(2000, seed=1)), model_prefix=path_prefix,
        vocab_size=VOCAB, model_type="bpe", byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, num_threads=1)


def eval_texts():
    texts = corpus(6, seed=7)
    texts.append("Café au lait, naïve façade — ünïcode bytes!")  # byte-fallback pieces
    texts.append("The cat sat on the mat and the dog ran far away over the hill past "
                 "the old mill until dark.")  # longer than MAX_SEQ_LEN: truncated
    texts.append("Hi")
    return texts


def encode(sp, texts, bos):
    return [([bos] + sp.encode(t))[:MAX_SEQ_LEN] for t in texts]


@torch.no_grad()
def eval_loss(model, seqs):
    """DESIGN.md's eval: every position after the first is scored; mean NLL over all tokens."""
    total, count = 0.0, 0
    for ids in seqs:
        x = torch.tensor([ids])
        logp = torch.log_softmax(model(x).logits.double(), dim=-1)
        tgt = x[:, 1:]
        total += -logp[:, :-1].gather(-1, tgt.unsqueeze(-1)).sum().item()
        count += tgt.numel()
    return total / count, count


@torch.no_grad()
def logits_of(model, ids):
    return model(torch.tensor([ids])).logits[0].float().contiguous()


def write_config(folder, mutate):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    mutate(cfg)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def scale_up(model, std):
    # transformers' init (std 0.02) gives near-uniform outputs, where a wrong RoPE or a
    # mis-ordered head barely moves the loss; larger weights make every mistake visible.
    g = torch.Generator().manual_seed(1234)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        else:
            p.data = std * torch.randn(p.shape, generator=g)


def make_case(out, name, cfg_kwargs, spelling, dtype, shard, adapter,
              arch=(LlamaConfig, LlamaForCausalLM)):
    config_class, model_class = arch
    folder = os.path.join(out, name)
    model_dir = os.path.join(folder, "model")
    os.makedirs(model_dir, exist_ok=True)
    torch.manual_seed(0)
    cfg = config_class(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, **cfg_kwargs)
    model = model_class(cfg).float()
    scale_up(model, std=0.15)
    save_kwargs = {"max_shard_size": "24KB"} if shard else {}
    model.to(dtype).save_pretrained(model_dir, **save_kwargs)
    shutil.copy(os.path.join(out, "tokenizer.model"), model_dir)
    write_config(model_dir, spelling)

    # Reload from disk so transformers itself parses the spelling we wrote.
    base = model_class.from_pretrained(model_dir, dtype=torch.float32).eval()
    sp = spm.SentencePieceProcessor(model_file=os.path.join(model_dir, "tokenizer.model"))
    texts = eval_texts()
    seqs = encode(sp, texts, bos=1)
    with open(os.path.join(folder, "eval.jsonl"), "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")

    tensors = {"logits_base": logits_of(base, seqs[-2])}
    loss, count = eval_loss(base, seqs)
    expected = {"max_seq_len": MAX_SEQ_LEN, "base": {"loss": loss, "tokens": count},
                "token_ids": seqs, "logits_ids": seqs[-2]}

    # Position ids beyond the rope's original range exercise the scaling.
    long_ids = torch.randint(3, VOCAB, (1, 200), generator=torch.Generator().manual_seed(5))
    tensors["long_ids"] = long_ids[0].to(torch.int64)
    tensors["logits_long"] = base(long_ids).logits[0, -4:].float().contiguous()  # [4, V]

    ad_name, ad_cfg = adapter
    peft_model = get_peft_model(model_class.from_pretrained(model_dir, dtype=torch.float32),
                                ad_cfg)
    g = torch.Generator().manual_seed(99)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:  # PEFT's default B = 0 would make the adapter a no-op
            p.data = 0.2 * torch.randn(p.shape, generator=g)
    ad_dir = os.path.join(folder, ad_name)
    peft_model.save_pretrained(ad_dir)
    with open(os.path.join(ad_dir, "adapter_config.json")) as f:
        acfg = json.load(f)
    acfg["base_model_name_or_path"] = name
    with open(os.path.join(ad_dir, "adapter_config.json"), "w") as f:
        json.dump(acfg, f, indent=2, sort_keys=True)
    loaded = PeftModel.from_pretrained(
        model_class.from_pretrained(model_dir, dtype=torch.float32), ad_dir).eval()
    loss, count = eval_loss(loaded, seqs)
    expected[ad_name] = {"loss": loss, "tokens": count}
    tensors["logits_" + ad_name] = logits_of(loaded, seqs[-2])

    save_file(tensors, os.path.join(folder, "reference.safetensors"))
    with open(os.path.join(folder, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    print(name, json.dumps({k: v for k, v in expected.items() if isinstance(v, dict)}))


def make_trained_case(out):
    folder = os.path.join(out, "trained_tiny")
    model_dir = os.path.join(folder, "model")
    os.makedirs(model_dir, exist_ok=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, hidden_size=48,
                      intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=128, rms_norm_eps=1e-5,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = LlamaForCausalLM(cfg).float()
    sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer.model"))
    stream = []
    for line in corpus(3000, seed=3):
        stream += [1] + sp.encode(line) + [2]
    data = torch.tensor(stream)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(4)
    model.train()
    for step in range(600):
        starts = torch.randint(0, len(stream) - 33, (32,), generator=g)
        batch = torch.stack([data[i:i + 32] for i in starts])
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    print("trained_tiny final training loss", loss.item())
    model.eval()
    model.save_pretrained(model_dir)
    shutil.copy(os.path.join(out, "tokenizer.model"), model_dir)
    greedy = []
    for prompt in ["The cat", "Children played in the", "Light rain fell"]:
        ids = [1] + sp.encode(prompt)
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12,
                                 eos_token_id=2, pad_token_id=2)[0, len(ids):].tolist()
        new = gen[:gen.index(2)] if 2 in gen else gen
        greedy.append({"prompt": prompt, "prompt_ids": ids, "new_ids": new,
                       "text": sp.decode(new)})
    with open(os.path.join(folder, "expected.json"), "w") as f:
        json.dump({"greedy": greedy}, f, indent=1)
    print("trained_tiny", json.dumps(greedy))


def to_v5_spelling(cfg):
    rp = cfg.get("rope_parameters") or {}
    rp.setdefault("rope_theta", cfg.pop("rope_theta", 10000.0))
    cfg.pop("rope_scaling", None)
    cfg["rope_parameters"] = rp


def to_v4_spelling(cfg):
    rp = dict(cfg.pop("rope_parameters", None) or {})
    cfg["rope_theta"] = rp.pop("rope_theta", 10000.0)
    rtype = rp.pop("rope_type", "default")
    cfg["rope_scaling"] = None if rtype == "default" else {"type": rtype, **rp}


def main():
    out = sys.argv[1]
    only = set(sys.argv[2:])  # case names; all when none
    os.makedirs(out, exist_ok=True)
    if os.environ.get("TOKENIZER"):  # the committed fixtures' tokenizer, to add cases to them
        shutil.copy(os.environ["TOKENIZER"], os.path.join(out, "tokenizer.model"))
    else:
        train_tokenizer(os.path.join(out, "tokenizer"))
        os.remove(os.path.join(out, "tokenizer.vocab"))
    seven = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    cases = {
        "gqa_llama3": lambda: make_case(
            out, "gqa_llama3",
            dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                 max_position_embeddings=256, rms_norm_eps=1e-5,
                 rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 64}),
            to_v5_spelling, torch.float32, shard=False,
            adapter=("lora_all", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=seven, task_type="CAUSAL_LM"))),
        "mha_linear": lambda: make_case(
            out, "mha_linear",
            dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=256,
                 rms_norm_eps=1e-6,
                 rope_parameters={"rope_type": "linear", "rope_theta": 500000.0, "factor": 2.0}),
            to_v4_spelling, torch.bfloat16, shard=True,
            adapter=("lora_rslora", LoraConfig(r=8, lora_alpha=4, lora_dropout=0.1,
                                                use_rslora=True, target_modules=["q_proj", "v_proj"],
                                                task_type="CAUSAL_LM"))),
        "qwen2_bias": lambda: make_case(
            out, "qwen2_bias",
            dict(small, tie_word_embeddings=True, rms_norm_eps=1e-6, use_sliding_window=False,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
            to_v5_spelling, torch.bfloat16, shard=False,
            adapter=("lora_qkvo", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                              target_modules=seven[:4], task_type="CAUSAL_LM")),
            arch=(Qwen2Config, Qwen2ForCausalLM)),
        "qwen3_norm": lambda: make_case(
            out, "qwen3_norm",
            dict(small, head_dim=16, tie_word_embeddings=False, rms_norm_eps=1e-6,
                 attention_bias=False, use_sliding_window=False,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
            to_v5_spelling, torch.float32, shard=False,
            adapter=("lora_all", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=seven, task_type="CAUSAL_LM")),
            arch=(Qwen3Config, Qwen3ForCausalLM)),
        "mistral_swa": lambda: make_case(
            out, "mistral_swa",
            dict(small, tie_word_embeddings=False, rms_norm_eps=1e-5, sliding_window=256,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
            to_v4_spelling, torch.float32, shard=False,
            adapter=("lora_mlp", LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=seven[4:], task_type="CAUSAL_LM")),
            arch=(MistralConfig, MistralForCausalLM)),
        "trained_tiny": lambda: make_trained_case(out),
    }
    for name, make in cases.items():
        if not only or name in only:
            make()
    os.remove(os.path.join(out, "tokenizer.model"))  # each model folder holds its copy
    for root, _, files in os.walk(out):
        for f in files:
            if f == "README.md":
                os.remove(os.path.join(root, f))


if __name__ == "__main__":
    main()
