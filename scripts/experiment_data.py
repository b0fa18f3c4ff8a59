"""What the experiments' data generators share (scripts/make_multitask_data.py,
scripts/make_passkey_data.py): JSON Lines output, and the config and tokenizer of the small
LLaMA each experiment trains from scratch with `lorafit init --from`. No third-party packages.
"""
import json
import os
import shutil

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def small_llama(out, config_from):
    """Writes OUT/config.json, a 4-layer LLaMA (hidden 128, intermediate 384, 4 heads, 2 KV
    heads, 128 positions) with the rest of tests/fixtures/CONFIG_FROM/model/config.json (its
    RoPE among it), and the tiny fixtures' tokenizer.model beside it."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(FIXTURES, config_from, "model", "config.json")) as f:
        config = json.load(f)
    config.update(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  max_position_embeddings=128)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    shutil.copy(os.path.join(FIXTURES, "gqa_llama3", "model", "tokenizer.model"), out)
