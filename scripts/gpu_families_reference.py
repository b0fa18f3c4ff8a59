"""transformers' and PEFT's side of scripts/gpu_families_check.sh.

    gpu_families_reference.py make TOKENIZERS_DIR WORK_DIR
        Writes four tiny checkpoints with transformers, each with a real tokenizer: llama3
        (llama3 RoPE, tied, Llama-3.1 tokenizer.json), qwen2 (q/k/v biases, Qwen3 tokenizer),
        qwen3 (q/k norms, head_dim != hidden/heads, Qwen3 tokenizer) and mistral (a sliding
        window longer than the data, Llama-3.1 tokenizer.json); WORK_DIR/reference.json holds
        AutoTokenizer's ids of WORK_DIR/corpus.jsonl and each model's eval loss as `lorafit
        eval` defines it (each record tokenized as tokenizer(text) does, cut to 64 tokens,
        every position after the first scored, the mean over all scored tokens), and
        WORK_DIR/chat/*.json apply_chat_template's text and ids of a set of conversations.
    gpu_families_reference.py eval WORK_DIR MODEL_DIR [ADAPTER_DIR]
        That eval loss of WORK_DIR/corpus.jsonl (PEFT applying the adapter when one is
        given), as one JSON line.
"""
import json
import os
import shutil
import sys

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig,
                          Qwen2Config, Qwen3Config)

MAX_LEN = 64
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
LLAMA_EOS = dict(bos_token_id=128000, eos_token_id=[128001, 128008, 128009])
QWEN_EOS = dict(bos_token_id=151643, eos_token_id=151645)
MODELS = {
    "llama3": ("llama3_1", LlamaConfig(
        vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
        tie_word_embeddings=True, **SMALL, **LLAMA_EOS,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    "qwen2": ("qwen3", Qwen2Config(
        vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
        tie_word_embeddings=True, use_sliding_window=False, rms_norm_eps=1e-6, **SMALL,
        **QWEN_EOS)),
    "qwen3": ("qwen3", Qwen3Config(
        vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0, head_dim=32,
        tie_word_embeddings=True, use_sliding_window=False, attention_bias=False,
        rms_norm_eps=1e-6, **SMALL, **QWEN_EOS)),
    "mistral": ("llama3_1", MistralConfig(
        vocab_size=128256, max_position_embeddings=32768, rope_theta=1000000.0,
        sliding_window=4096, tie_word_embeddings=False, **SMALL, **LLAMA_EOS)),
}

SYSTEM = {"role": "system", "content": "You are a terse assistant. Answer in one line."}
CONVERSATIONS = [
    ([SYSTEM, {"role": "user", "content": "What is 2 + 2?"},
      {"role": "assistant", "content": "4"}], {}),
    ([{"role": "user", "content": "  Name a colour.  "},
      {"role": "assistant", "content": "Blue — like the sky.\n"},
      {"role": "user", "content": "Another, in 日本語?"},
      {"role": "assistant", "content": "赤 (red) 🍎"}], {}),
    ([SYSTEM, {"role": "user", "content": "Say <|eot_id|> or <|im_end|> literally."}],
     {"add_generation_prompt": True}),
    ([{"role": "user", "content": "Hi"}], {"add_generation_prompt": True}),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
      {"role": "user", "content": "Bye"}], {"add_generation_prompt": True}),
]
QWEN_ONLY = [
    ([{"role": "user", "content": "Think, then answer: 3 * 3?"},
      {"role": "assistant", "content": "<think>\nThree threes.\n</think>\n\n9"}], {}),
    ([{"role": "user", "content": "Q1"},
      {"role": "assistant", "content": "<think>\nfirst\n</think>\n\nA1"},
      {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}], {}),
    ([{"role": "user", "content": "Quick: 1 + 1?"}],
     {"add_generation_prompt": True, "enable_thinking": False}),
    ([SYSTEM, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
      {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}],
     {"enable_thinking": False}),
]


def corpus(work):
    return [json.loads(l)["text"] for l in open(os.path.join(work, "corpus.jsonl"))]


@torch.no_grad()
def eval_loss(model, tok, texts):
    nll, count = 0.0, 0
    for t in texts:
        ids = tok(t)["input_ids"][:MAX_LEN]
        if len(ids) < 2:
            continue
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        nll -= logp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
        count += len(ids) - 1
    return {"loss": nll / count, "tokens": count}


def chat_cases(tok, cases):
    out = []
    for messages, kwargs in cases:
        text = tok.apply_chat_template(messages, tokenize=False, **kwargs)
        ids = tok.apply_chat_template(messages, tokenize=True, **kwargs)
        if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
        out.append({"messages": messages, "kwargs": kwargs, "text": text, "ids": ids})
    return out


def make(src, work):
    texts = corpus(work)
    ref = {}
    for name, (tok_name, config) in MODELS.items():
        folder = os.path.join(work, name)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).float().eval()
        with torch.no_grad():  # weights large enough that the loss depends on all of them
            for pname, p in model.named_parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.2)
                elif "norm" in pname:
                    p.copy_(1 + 0.1 * torch.randn(p.shape))
                else:  # qwen2's q/k/v biases
                    p.normal_(0, 0.2)
        model.save_pretrained(folder, safe_serialization=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(src, tok_name, f), folder)
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        ref[name] = {"ids": [tok(t)["input_ids"] for t in texts], **eval_loss(model, tok, texts)}
        print(name, type(model).__name__, ref[name]["loss"], ref[name]["tokens"], "tokens")
    json.dump(ref, open(os.path.join(work, "reference.json"), "w"))
    os.makedirs(os.path.join(work, "chat"), exist_ok=True)
    for tok_name, cases in (("llama3_1", CONVERSATIONS), ("qwen3", CONVERSATIONS + QWEN_ONLY)):
        tok = AutoTokenizer.from_pretrained(os.path.join(src, tok_name))
        with open(os.path.join(work, "chat", tok_name + ".json"), "w") as f:
            json.dump(chat_cases(tok, cases), f, ensure_ascii=False, indent=1)


def evaluate(work, model_dir, adapter):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter)
    tok = AutoTokenizer.from_pretrained(model_dir)
    print(json.dumps(eval_loss(model.eval(), tok, corpus(work))))


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3])
    else:
        evaluate(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
