// The model against transformers and PEFT: tests/fixtures/*/reference.safetensors and
// expected.json were written by scripts/make_reference_fixtures.py (fp32, CPU), for LLaMA,
// Qwen2 (q/k/v biases), Qwen3 (q/k norms) and Mistral checkpoints.
#include <catch2/catch.hpp>

#include "adapters/lora.h"
#include "adapters/registry.h"
#include "core/adapter_io.h"
#include "core/datasets.h"
#include "core/errors.h"
#include "core/eval.h"
#include "core/llama.h"
#include "core/loss.h"
#include "core/safetensors.h"
#include "test_util.h"

using namespace lorafit;
using lorafit::test::fixture;
using lorafit::test::rel_err;

namespace {

constexpr double kTol = 1e-5;

struct Case {
  std::string name;     // fixture folder
  std::string adapter;  // its PEFT adapter folder
};

const Case kCases[] = {{"gqa_llama3", "lora_all"},
                       {"mha_linear", "lora_rslora"},
                       {"qwen2_bias", "lora_qkvo"},
                       {"qwen3_norm", "lora_all"},
                       {"mistral_swa", "lora_mlp"}};

torch::Tensor ids_tensor(const nlohmann::json& ids) {
  return torch::tensor(ids.get<std::vector<int64_t>>(), torch::kInt64).unsqueeze(0);  // [1, T]
}

torch::Tensor logits_of(LlamaForCausalLM& model, const torch::Tensor& ids) {
  torch::NoGradGuard no_grad;
  model->eval();                                 // the rsLoRA fixture has dropout 0.1
  return model->logits(model->forward(ids))[0];  // [T, V]
}

}  // namespace

TEST_CASE("logits equal transformers' on the fixture checkpoints", "[core][llama]") {
  for (const auto& c : kCases) {
    INFO(c.name);
    auto model = load_llama(fixture(c.name + "/model"), torch::kCPU, torch::kFloat32);
    SafetensorsFile ref(fixture(c.name + "/reference.safetensors"));
    const auto expected = lorafit::test::read_json(fixture(c.name + "/expected.json"));
    REQUIRE(rel_err(logits_of(model, ids_tensor(expected["logits_ids"])),
                    ref.tensor("logits_base")) < kTol);
    // Positions far past the rope's original range: the scaling (llama3 or linear) must match.
    auto long_logits = logits_of(model, ref.tensor("long_ids").unsqueeze(0));
    REQUIRE(rel_err(long_logits.narrow(0, long_logits.size(0) - 4, 4), ref.tensor("logits_long")) <
            kTol);
  }
}

TEST_CASE("a PEFT adapter applied unmerged gives PEFT's logits", "[core][llama][lora]") {
  for (const auto& c : kCases) {
    INFO(c.name);
    auto model = load_llama(fixture(c.name + "/model"), torch::kCPU, torch::kFloat32);
    load_adapter(fixture(c.name + "/" + c.adapter), model);
    SafetensorsFile ref(fixture(c.name + "/reference.safetensors"));
    const auto expected = lorafit::test::read_json(fixture(c.name + "/expected.json"));
    auto logits = logits_of(model, ids_tensor(expected["logits_ids"]));
    REQUIRE(rel_err(logits, ref.tensor("logits_" + c.adapter)) < kTol);
    REQUIRE(rel_err(logits, ref.tensor("logits_base")) > 1e-3);  // the adapter does something
  }
}

TEST_CASE("eval loss equals transformers' and PEFT's", "[core][eval]") {
  for (const auto& c : kCases) {
    INFO(c.name);
    const auto expected = lorafit::test::read_json(fixture(c.name + "/expected.json"));
    auto model = load_llama(fixture(c.name + "/model"), torch::kCPU, torch::kFloat32);
    const auto seqs =
        eval_examples(fixture(c.name + "/eval.jsonl"), load_tokenizer(fixture(c.name + "/model")),
                      "text", model->config, expected["max_seq_len"].get<int64_t>());
    std::vector<std::vector<int64_t>> ids;
    for (const auto& ex : seqs) ids.push_back(ex.input_ids);
    REQUIRE(nlohmann::json(ids) == expected["token_ids"]);
    for (int64_t batch : {1, 4}) {  // padding in batches must not change the result
      const auto base = evaluate(model, seqs, batch);
      REQUIRE(base.tokens == expected["base"]["tokens"].get<int64_t>());
      REQUIRE(base.loss == Approx(expected["base"]["loss"].get<double>()).epsilon(kTol));
    }
    load_adapter(fixture(c.name + "/" + c.adapter), model);
    const auto adapted = evaluate(model, seqs, 3);
    REQUIRE(adapted.loss == Approx(expected[c.adapter]["loss"].get<double>()).epsilon(kTol));
  }
}

TEST_CASE("tied embeddings share one tensor with the head", "[core][llama]") {
  auto tied = load_llama(fixture("gqa_llama3/model"), torch::kCPU, torch::kFloat32);
  REQUIRE(tied->lm_head->weight.data_ptr() == tied->model->embed_tokens->weight.data_ptr());
  auto untied = load_llama(fixture("mha_linear/model"), torch::kCPU, torch::kFloat32);
  REQUIRE(untied->lm_head->weight.data_ptr() != untied->model->embed_tokens->weight.data_ptr());
}

TEST_CASE("base weights are frozen and every projection goes through the hook", "[core][llama]") {
  auto model = load_llama(fixture("gqa_llama3/model"), torch::kCPU, torch::kFloat32);
  for (const auto& p : model->parameters()) REQUIRE_FALSE(p.requires_grad());
  const auto projections = model->projections();
  REQUIRE(projections.size() == 7 * 2);
  REQUIRE(projections.front()->name == "model.layers.0.self_attn.q_proj");
  REQUIRE(projections.back()->name == "model.layers.1.mlp.down_proj");
}

TEST_CASE("bf16 weights load into an f32 model exactly", "[core][llama]") {
  auto model = load_llama(fixture("mha_linear/model"), torch::kCPU, torch::kFloat32);
  SafetensorsCheckpoint ckpt(fixture("mha_linear/model"));
  REQUIRE(model->model->norm->weight.scalar_type() == torch::kFloat32);
  REQUIRE(torch::equal(model->model->norm->weight,
                       ckpt.tensor("model.norm.weight").to(torch::kFloat32)));
}

TEST_CASE("llama3 rope frequencies cover all three bands", "[core][llama]") {
  const auto c = load_llama_config(fixture("gqa_llama3/model"));
  auto plain = c;
  plain.rope.type = RopeType::Default;
  const auto scaled = rope_inv_freq(c), base = rope_inv_freq(plain);
  const auto ratio = (base / scaled);  // 1 (high freq), factor (low freq), or in between
  REQUIRE(ratio[0].item<float>() == Approx(1.0));
  REQUIRE(ratio[-1].item<float>() == Approx(c.rope.factor));
  const auto between = ratio.gt(1.0001).logical_and(ratio.lt(c.rope.factor - 1e-4));
  REQUIRE(between.any().item<bool>());
}

TEST_CASE("a checkpoint that does not match its config names every bad tensor", "[core][llama]") {
  lorafit::test::TempDir tmp;
  const auto dir = lorafit::test::copy_fixture("gqa_llama3/model", tmp / "m");
  SafetensorsFile file(dir + "/model.safetensors");
  TensorMap tensors;
  for (const auto& e : file.header().entries) tensors[e.name] = file.tensor(e.name).clone();
  tensors.erase("model.layers.1.mlp.up_proj.weight");
  tensors["model.layers.0.self_attn.k_proj.weight"] = torch::zeros({3, 32});
  tensors["model.layers.9.extra.weight"] = torch::zeros({1});
  save_safetensors(dir + "/model.safetensors", tensors);
  try {
    load_llama(dir, torch::kCPU, torch::kFloat32);
    FAIL("no error");
  } catch (const ModelMismatchError& e) {
    const std::string msg = e.what();
    REQUIRE_THAT(msg,
                 Catch::Contains("missing tensor 'model.layers.1.mlp.up_proj.weight' [64, 32]"));
    REQUIRE_THAT(
        msg, Catch::Contains(
                 "'model.layers.0.self_attn.k_proj.weight' has shape [3, 32], expected [32, 32]"));
    REQUIRE_THAT(msg, Catch::Contains("unexpected tensor 'model.layers.9.extra.weight'"));
  }
}

TEST_CASE("only adapter tensors train and a step leaves the base untouched",
          "[core][llama][lora]") {
  auto model = load_llama(fixture("gqa_llama3/model"), torch::kCPU, torch::kFloat32);
  const auto& spec = find_adapter("lora");
  spec.attach_new({4, 8.0, 0.0, false, {"q_proj", "up_proj"}}, model->adapter_sites());
  const auto params = trainable_parameters(model);
  REQUIRE(params.size() == 2 * 2 * 2);  // layers x targets x (A, B)
  std::map<std::string, torch::Tensor> before;
  for (const auto& item : model->named_parameters()) {
    const bool adapter = item.key().find(".adapter.") != std::string::npos;
    REQUIRE(item.value().requires_grad() == adapter);
    if (!adapter) before[item.key()] = item.value().clone();
  }
  torch::optim::AdamW opt(params, torch::optim::AdamWOptions(1e-2));
  auto ids = torch::randint(3, 320, {2, 8}, torch::kInt64);
  model->logits(model->forward(ids)).pow(2).mean().backward();
  opt.step();
  for (const auto& [name, t] : before) REQUIRE(torch::equal(model->named_parameters()[name], t));
}

TEST_CASE("full fine-tuning trains every base tensor once and checkpointing keeps its gradients",
          "[core][llama][full]") {
  auto grads = [](bool checkpoint) {
    auto model = load_llama(fixture("gqa_llama3/model"), torch::kCPU, torch::kFloat64);
    const auto params = trainable_parameters(model, every_base_tensor);
    REQUIRE(params.size() == model->checkpoint_tensors().size());  // the tied head once
    REQUIRE(model->lm_head->weight.requires_grad());
    model->train();
    model->checkpoint_layers = checkpoint;
    // o_proj's weight gradient without its value, gate's and up's from their kept output
    model->checkpoint_keep.residual = true;
    model->checkpoint_keep.gate_up = true;
    torch::manual_seed(3);
    auto ids = torch::randint(3, 320, {2, 10}, torch::kInt64);
    model->logits(model->forward(ids)).pow(2).mean().backward();
    std::vector<torch::Tensor> out;
    for (const auto& p : params) out.push_back(p.grad().clone());
    return out;
  };
  const auto plain = grads(false), checkpointed = grads(true);
  lorafit::test::require_same_gradients(plain, checkpointed);
}

TEST_CASE("activation checkpointing gives the gradients of the plain backward", "[core][llama]") {
  // In float64, with LoRA dropout (the recomputation must replay the same dropout masks) and
  // without (the fused projections skip the GEMMs whose values the backward never reads). A
  // kept residual skips o_proj's GEMM and splits the backward in two; a kept gate/up output
  // skips their GEMM and runs the MLP's backward from it first (attention keeps only where
  // flash attention runs, so on the CPU it is recomputed).
  auto grads = [](double dropout, bool checkpoint, CheckpointKeep keep) {
    torch::manual_seed(5);
    auto model = load_llama(fixture("gqa_llama3/model"), torch::kCPU, torch::kFloat64);
    find_adapter("lora").attach_new(
        {4, 8.0, dropout, false, {"q_proj", "v_proj", "o_proj", "up_proj", "down_proj"}},
        model->adapter_sites());
    for (auto p : model->projections()) {
      if (p->adapter) {
        torch::NoGradGuard g;
        p->adapter->as<LoraImpl>()->lora_B.normal_();
      }
    }
    model->to(torch::kFloat64);
    const auto params = trainable_parameters(model);
    model->train();
    model->checkpoint_layers = checkpoint;
    model->checkpoint_keep = keep;
    auto ids = torch::randint(3, 320, {2, 10}, torch::kInt64);
    model->logits(model->forward(ids)).pow(2).mean().backward();
    std::vector<torch::Tensor> out;
    for (const auto& p : params) out.push_back(p.grad().clone());
    return out;
  };
  // The first layer alone keeping gate/up: the layers that keep and those that recompute it
  // hand each other their gradients.
  auto first_gate_up = CheckpointKeep{false, true, true};
  first_gate_up.gate_up_layers = 1;
  for (const double dropout : {0.2, 0.0}) {
    const auto plain = grads(dropout, false, {});
    for (const auto keep :
         {CheckpointKeep{}, CheckpointKeep{false, true}, CheckpointKeep{true, true},
          CheckpointKeep{false, false, true}, CheckpointKeep{false, true, true}, first_gate_up}) {
      INFO("dropout " << dropout << ", keeping attention " << keep.attention << ", residual "
                      << keep.residual << ", gate/up " << keep.gate_up << " in "
                      << keep.gate_up_layers << " layers");
      lorafit::test::require_same_gradients(plain, grads(dropout, true, keep));
    }
  }
}

TEST_CASE("the chunked loss head gives the composite log-softmax and its gradients",
          "[core][eval]") {
  // Float64, more rows than one chunk, gradients for both the hidden states and the head;
  // every third target is ignored (-100) and must add nothing, not even gradient.
  auto model = load_llama(fixture("gqa_llama3/model"), torch::kCPU, torch::kFloat64);
  auto hidden = torch::randn({2500, 32}, torch::kFloat64).requires_grad_(true);
  auto targets = torch::randint(0, 320, {2500}, torch::kInt64);
  targets.slice(0, 0, 2500, 3).fill_(kIgnoreLabel);
  auto weight = model->lm_head->weight;
  weight.set_requires_grad(true);
  auto fused = target_log_prob_sum(model, hidden, targets);
  fused.backward();
  const auto fused_h = hidden.grad().clone(), fused_w = weight.grad().clone();
  hidden.mutable_grad().reset();
  weight.mutable_grad().reset();
  const auto keep = targets.ge(0);
  auto composite = torch::log_softmax(hidden.index({keep}).matmul(weight.t()), -1)
                       .gather(1, targets.index({keep}).unsqueeze(1))
                       .sum();
  composite.backward();
  REQUIRE(fused.item<double>() == Approx(composite.item<double>()).epsilon(1e-12));
  REQUIRE(torch::allclose(fused_h, hidden.grad(), 1e-10, 1e-12));
  REQUIRE(fused_h.slice(0, 0, 2500, 3).abs().max().item<double>() == 0.0);
  REQUIRE(torch::allclose(fused_w, weight.grad(), 1e-10, 1e-12));
}

TEST_CASE("eval's exact match is greedy decoding reproducing the response", "[core][eval]") {
  // trained_tiny's greedy continuations, recorded by transformers, as scored responses (the
  // prompt masked): each is an exact match; changing any one of its tokens makes it a miss.
  auto model = load_llama(fixture("trained_tiny/model"), torch::kCPU, torch::kFloat32);
  const auto expected = lorafit::test::read_json(fixture("trained_tiny/expected.json"));
  std::vector<Example> exact, changed;
  for (const auto& case_ : expected["greedy"]) {
    Example ex;
    ex.input_ids = case_["prompt_ids"].get<std::vector<int64_t>>();
    ex.labels.assign(ex.input_ids.size(), kIgnoreLabel);
    for (int64_t id : case_["new_ids"]) {
      ex.input_ids.push_back(id);
      ex.labels.push_back(id);
    }
    exact.push_back(ex);
    for (size_t j = case_["prompt_ids"].size(); j < ex.input_ids.size(); j += 5) {
      auto other = ex;
      other.labels[j] = other.input_ids[j] = (other.input_ids[j] + 1) % 320;
      changed.push_back(other);
    }
  }
  const auto all = evaluate(model, exact, 2);
  REQUIRE(all.records == 3);
  REQUIRE(all.exact == 3);
  REQUIRE(all.tokens == 36);
  const auto none = evaluate(model, changed, 2);
  REQUIRE(none.records == static_cast<int64_t>(changed.size()));
  REQUIRE(none.exact == 0);
  REQUIRE(none.loss > all.loss);
}
