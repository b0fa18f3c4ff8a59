#!/usr/bin/env python3
"""The seed systems' own code reads what lorafit writes, and lorafit reads what they write
(issue 22). Run by scripts/gpu_seed_formats.sh on the GPU machine, on the CPU in float32:

    seed_formats_check.py LORAFIT OUT

- MoE-PEFT's LLMModel.load_adapter and the MixLoRA package's load_adapter_weights +
  inject_adapter_in_model read a MixLoRA that lorafit trained (expert_lora overrides and
  attention LoRA), and their forward gives lorafit's eval loss;
- lorafit reads a MixLoRA that MoE-PEFT's save_adapter_weight wrote, a PEFT LoRA saved as
  adapter_model.bin, and that LoRA with a LongLoRA trainable_params.bin, and gives the loss of
  MoE-PEFT, PEFT, and LongLoRA's loading procedure (load_state_dict(strict=False) then PEFT).
The folders lorafit read go to OUT/fixtures with the reference losses, for tests/fixtures.
The seed tools' sources come from their public repositories through PYTHONPATH.
"""
import json
import os
import shutil
import subprocess
import sys
import traceback
from types import ModuleType, SimpleNamespace

import sentencepiece as spm
import torch

LORAFIT, OUT = sys.argv[1], sys.argv[2]
# MoE-PEFT takes head_dim = hidden / heads and knows the default RoPE only: trained_tiny.
MODEL, DATA, MAX_LEN = "tests/fixtures/trained_tiny/model", "tests/fixtures/mha_linear/eval.jsonl", 24
WORK = "/tmp/lorafit-seed"
TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
results = []


def records():
    sp = spm.SentencePieceProcessor(model_file=f"{MODEL}/tokenizer.model")
    bos = json.load(open(f"{MODEL}/config.json"))["bos_token_id"]
    for line in open(DATA):
        if line.strip():
            ids = ([bos] + sp.encode(json.loads(line)["text"]))[:MAX_LEN]
            if len(ids) >= 2:
                yield ids


def nll(logits_of):
    """Mean next-token NLL over every record, as `lorafit eval` defines it."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in records():
            logp = torch.log_softmax(logits_of(ids).double(), -1)
            total -= logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()
            count += len(ids) - 1
    return {"loss": total / count, "tokens": count}


def lorafit_eval(adapter):
    out = subprocess.run([LORAFIT, "eval", "--json", "--device", "cpu", "--model", MODEL,
                          "--adapter", adapter, "--data", DATA, "--max-seq-len", str(MAX_LEN)],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout)


def compare(name, ref, ours, tol=1e-4):
    rel = abs(ref["loss"] - ours["loss"]) / ref["loss"]
    ok = rel < tol and ref["tokens"] == ours["tokens"]
    results.append((name, ref["loss"], ours["loss"], rel, ok))
    print(f"{name}: reference {ref['loss']:.8f} lorafit {ours['loss']:.8f} rel {rel:.1e} "
          f"tokens {ref['tokens']}/{ours['tokens']} {'ok' if ok else 'FAIL'}", flush=True)


def part(fn):
    print(f"== {fn.__doc__}", flush=True)
    try:
        fn()
    except Exception:
        traceback.print_exc()
        results.append((fn.__doc__, 0, 0, 0, False))


def base_loss():
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    return nll(lambda ids: m(torch.tensor([ids])).logits[0])


# --- lorafit -> MoE-PEFT, MixLoRA ----------------------------------------------------------

def train_mixlora(name, experts):
    recipe = f"""model: {MODEL}
output: {WORK}/{name}
seed: 3
device: cpu
data: {{train: recipes/data/tiny_train.jsonl, format: text, max_seq_len: 64, packing: true}}
adapter: {{type: mixlora, r: 4, alpha: 8, dropout: 0.05, targets: {json.dumps(TARGETS)},
          num_experts: 4, top_k: 2, router_aux_loss_coef: 0.01{experts}}}
train: {{steps: 60, batch_size: 8, micro_batch_size: 4, lr: 5.0e-3, warmup_steps: 5,
        log_every: 20, eval_every: 0, save_every: 0}}
"""
    open(f"{WORK}/{name}.yaml", "w").write(recipe)
    r = subprocess.run([LORAFIT, "train", f"{WORK}/{name}.yaml"], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr)
    return f"{WORK}/{name}/adapter"


def moe_peft_model():
    os.environ["MOE_PEFT_EVALUATE_MODE"] = "1"  # the plain operators: their dropout obeys eval()
    # MoE-PEFT imports datasets and evaluate at module level, for training data and metrics;
    # loading, running and saving an adapter never calls them, and this machine cannot install
    # them (no registry): empty modules stand in for the import statements alone.
    for name in ("datasets", "evaluate"):
        sys.modules.setdefault(name, ModuleType(name))
    import moe_peft
    from moe_peft.models import from_pretrained
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    # MoE-PEFT reads transformers 4.x's config fields (rope_theta, rope_scaling); 5.x keeps
    # them in rope_parameters: the same values are put where MoE-PEFT looks. Then the steps of
    # its LLMModel.from_pretrained after loading the checkpoint.
    rope = dict(hf.config.rope_parameters)
    hf.config.rope_theta = rope.pop("rope_theta")
    hf.config.rope_scaling = rope if rope.get("rope_type", "default") != "default" else None
    hf.requires_grad_(False)
    return moe_peft, moe_peft.LLMModel(from_pretrained(hf, attn_impl="eager", device="cpu"))


def moe_peft_eval_off(model):
    # MoE-PEFT keeps its LoRAs in plain dicts, out of reach of Module.eval(): evaluation means
    # no dropout, so each one is put in eval mode by hand.
    for layer in model.model_.layers_:
        for group in layer.state_dict():
            for linear in group.values():
                for lora in linear.loras_.values():
                    lora.eval()


def moe_peft_logits(moe_peft, model, name):
    def run(ids):
        inp = moe_peft.LLMModelInput(
            batch_configs_=[moe_peft.LLMBatchConfig(adapter_name_=name, batch_start_idx_=0,
                                                    batch_end_idx_=1)],
            batch_tokens_=[ids], batch_masks_=[[True] * len(ids)], inference_mode_=True)
        return model.forward(inp)[0].logits[0]
    return run


def moe_peft_reads_lorafit():
    """MoE-PEFT's loader reads lorafit's MixLoRA (expert_lora, attention LoRA)"""
    adapter = train_mixlora("mx", ", expert_r: 6, expert_alpha: 12")
    cfg = json.load(open(f"{adapter}/adapter_config.json"))
    print("lorafit's adapter_config.json:", json.dumps(cfg, sort_keys=True))
    torch.load(f"{adapter}/adapter_model.bin", weights_only=True)  # what the MixLoRA package does
    moe_peft, model = moe_peft_model()
    model.load_adapter(adapter, "a")
    moe_peft_eval_off(model)
    compare("MoE-PEFT reads lorafit's MixLoRA", nll(moe_peft_logits(moe_peft, model, "a")),
            lorafit_eval(adapter))


def mixlora_package_reads_lorafit():
    """The MixLoRA package reads lorafit's MixLoRA (its experts take the top-level r and alpha)"""
    from mixlora.model import inject_adapter_in_model, load_adapter_weights
    from transformers import AutoModelForCausalLM

    def package_model(adapter):
        model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
        config, weights = load_adapter_weights(adapter, device="cpu", dtype=torch.float32)
        inject_adapter_in_model(model, config, weights)
        model.eval()
        # Its MoE blocks and their experts sit in plain dicts, out of reach of Module.eval():
        # no dropout, by hand.
        for m in model.modules():
            for moe in getattr(m, "mixlora_moes", {}).values():
                moe.eval()
                for expert in moe.experts_.values():
                    expert.eval()
        return model

    # It ignores expert_lora and builds every expert from the top-level r: with an override it
    # cannot load the file; this shows that limit rather than counting it against lorafit.
    try:
        package_model(f"{WORK}/mx/adapter")
        print("with expert_lora overrides: loaded")
    except RuntimeError as e:
        print("with expert_lora overrides: the package refuses:", str(e).splitlines()[0])
    adapter = train_mixlora("mx_plain", "")
    model = package_model(adapter)
    compare("MixLoRA package reads lorafit's MixLoRA (no expert_lora)",
            nll(lambda ids: model(torch.tensor([ids])).logits[0]), lorafit_eval(adapter))


# --- MoE-PEFT, PEFT, LongLoRA -> lorafit ---------------------------------------------------

def lorafit_reads_moe_peft():
    """lorafit reads a MixLoRA that MoE-PEFT's save_adapter_weight wrote"""
    moe_peft, model = moe_peft_model()
    from moe_peft.adapters import lora_config_factory
    from moe_peft.trainer import save_adapter_weight
    config = lora_config_factory({
        "name": "mp", "task_name": "casual", "peft_type": "MIXLORA", "routing_strategy": "mixlora",
        "num_experts": 4, "top_k": 2, "r": 4, "lora_alpha": 8, "lora_dropout": 0.05,
        "target_modules": TARGETS, "router_aux_loss_coef": 0.01,
        "expert_lora": {"r": 6, "lora_alpha": 12, "lora_dropout": 0.05}})
    model.init_adapter(config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # trained-looking weights: every B non-zero, the router moved
        for t in model.get_adapter_weight_dict("mp").values():
            t.add_(0.3 * torch.randn(t.shape, generator=g).to(t.dtype))
    save_adapter_weight(model, SimpleNamespace(adapter_name="mp",
                                               task_=SimpleNamespace(peft_task_type="CAUSAL_LM")),
                        WORK)
    moe_peft_eval_off(model)
    ref = nll(moe_peft_logits(moe_peft, model, "mp"))
    folder = f"{WORK}/mp"
    print("MoE-PEFT wrote:", sorted(os.listdir(folder)),
          json.dumps(json.load(open(f"{folder}/adapter_config.json")), sort_keys=True))
    compare("lorafit reads MoE-PEFT's MixLoRA", ref, lorafit_eval(folder))
    keep("moe_peft_mixlora", folder, ref)


def lorafit_reads_peft_bin():
    """lorafit reads PEFT's LoRA as adapter_model.bin, and LongLoRA's trainable_params.bin"""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(5)
    base = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                           task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    folder = f"{WORK}/lora_bin"
    peft.save_pretrained(folder, safe_serialization=False)
    os.remove(f"{folder}/README.md") if os.path.exists(f"{folder}/README.md") else None
    print("PEFT wrote:", sorted(os.listdir(folder)))
    peft.eval()
    ref = nll(lambda ids: peft(torch.tensor([ids])).logits[0])
    compare("lorafit reads PEFT's adapter_model.bin", ref, lorafit_eval(folder))
    keep("lora_bin", folder, ref)

    # LongLoRA: embeddings and norms trained beside the LoRA, torch.save'd under the model's
    # names; its eval and merge scripts load them with load_state_dict(strict=False), then PEFT.
    folder2 = f"{WORK}/lora_bin_longlora"
    shutil.copytree(folder, folder2)
    g = torch.Generator().manual_seed(9)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    trained = {k: v + 0.3 * torch.randn(v.shape, generator=g)
               for k, v in model.state_dict().items() if "norm" in k}
    torch.save(trained, f"{folder2}/trainable_params.bin")
    model.load_state_dict(torch.load(f"{folder2}/trainable_params.bin"), strict=False)
    model = PeftModel.from_pretrained(model, folder2).eval()
    ref2 = nll(lambda ids: model(torch.tensor([ids])).logits[0])
    compare("lorafit reads LongLoRA's trainable_params.bin", ref2, lorafit_eval(folder2))
    keep("lora_bin_longlora", folder2, ref2)


def keep(name, folder, ref):
    dst = f"{OUT}/fixtures/{name}"
    shutil.copytree(folder, dst)
    json.dump(ref, open(f"{dst}/expected_loss.json", "w"), indent=1)


if __name__ == "__main__":
    import transformers
    print("torch", torch.__version__, "transformers", transformers.__version__, flush=True)
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    os.makedirs(f"{OUT}/fixtures", exist_ok=True)
    print("base loss", base_loss())
    for fn in (moe_peft_reads_lorafit, mixlora_package_reads_lorafit, lorafit_reads_moe_peft,
               lorafit_reads_peft_bin):
        part(fn)
    print("\n| check | reference loss | lorafit loss | rel diff | |")
    print("|---|---|---|---|---|")
    for name, ref, ours, rel, ok in results:
        print(f"| {name} | {ref:.8f} | {ours:.8f} | {rel:.1e} | {'ok' if ok else 'FAIL'} |")
    sys.exit(0 if all(r[4] for r in results) else 1)
