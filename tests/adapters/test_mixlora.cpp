#include <catch2/catch.hpp>

#include "adapters/mixlora.h"
#include "adapters/registry.h"
#include "core/adapter_io.h"
#include "core/errors.h"
#include "core/llama.h"
#include "core/trainer.h"
#include "test_util.h"

using namespace lorafit;

namespace {

const std::vector<std::string> kAllKinds = {"gate_proj", "up_proj", "down_proj"};

Mlp random_mlp(torch::Dtype dtype) {
  LlamaConfig c;
  c.hidden_size = 8;
  c.intermediate_size = 12;
  Mlp mlp(c, "model.layers.0.mlp", torch::dtype(dtype));
  torch::NoGradGuard g;
  mlp->gate_up_weight.normal_();
  mlp->down_proj->weight.normal_();
  return mlp;
}

MixLora mixlora(torch::Dtype dtype,
                int64_t experts = 4,
                int64_t top_k = 2,
                const std::vector<std::string>& kinds = kAllKinds) {
  auto m =
      MixLora(8, 12, experts, top_k, kinds, /*r=*/3, /*scaling=*/0.5, 0.0, torch::dtype(dtype));
  m->to(dtype);
  return m;
}

// Experts that differ from the base and from each other.
void randomize_experts(MixLoraImpl& m) {
  torch::NoGradGuard g;
  for (auto& [kind, list] : m.experts)
    for (auto& lora : list) lora->lora_B.normal_();
  m.moe_gate.normal_();
}

}  // namespace

TEST_CASE("a fresh MixLoRA MLP equals the base MLP", "[adapters][mixlora]") {
  auto mlp = random_mlp(torch::kFloat32);
  auto x = torch::randn({2, 5, 8});
  const auto before = mlp(x);
  mlp->attach(mixlora(torch::kFloat32).ptr());
  REQUIRE(torch::allclose(mlp(x), before, 1e-5, 1e-5));
}

TEST_CASE("MixLoRA's efficient and per-expert paths agree", "[adapters][mixlora]") {
  const std::vector<std::vector<std::string>> kind_sets = {
      kAllKinds, {"up_proj", "down_proj"}, {"gate_proj"}, {"down_proj"}, {}};
  for (const auto& kinds : kind_sets) {
    INFO(kinds.size() << " kinds with expert LoRAs");
    // float64: the two paths sum in different orders.
    auto mlp = random_mlp(torch::kFloat64);
    auto m = mixlora(torch::kFloat64, 6, 2, kinds);
    randomize_experts(*m);
    mlp->attach(m.ptr());
    auto x = torch::randn({3, 7, 8}, torch::kFloat64);
    const auto efficient = mlp(x);
    m->per_expert_base = true;
    REQUIRE(torch::allclose(mlp(x), efficient, 1e-10, 1e-12));
    if (!kinds.empty())
      REQUIRE(!torch::allclose(efficient, random_mlp(torch::kFloat64)(x), 1e-2, 1e-2));
  }
}

TEST_CASE("MixLoRA gradients match a dense float64 composite", "[adapters][mixlora]") {
  auto mlp = random_mlp(torch::kFloat64);
  auto m = mixlora(torch::kFloat64, 4, 2);
  randomize_experts(*m);
  mlp->attach(m.ptr());
  auto x = torch::randn({10, 8}, torch::kFloat64).requires_grad_(true);
  auto upstream = torch::randn({10, 8}, torch::kFloat64);
  std::vector<torch::Tensor> params{m->moe_gate};
  for (const auto& kind : kAllKinds)
    for (auto& lora : m->experts.at(kind))
      params.insert(params.end(), {lora->lora_A, lora->lora_B});
  auto run = [&](const torch::Tensor& y) {
    y.backward(upstream);
    std::vector<torch::Tensor> out{y.detach(), x.grad().clone()};
    x.mutable_grad().reset();
    for (auto& p : params) {
      out.push_back(p.grad().defined() ? p.grad().clone() : torch::zeros_like(p));
      p.mutable_grad().reset();
    }
    return out;
  };
  const auto fused = run(mlp(x));

  // Every expert on every token, weighted by its renormalised top-k weight (0 if not chosen).
  auto p = torch::softmax(x.matmul(m->moe_gate.t()), -1);
  auto [w, chosen] = p.topk(2, -1);
  w = w / w.sum(-1, true);
  const auto wg = mlp->gate_up_weight.narrow(0, 0, 12), wu = mlp->gate_up_weight.narrow(0, 12, 12);
  auto lora = [&](const std::string& kind, int64_t e, const torch::Tensor& in) {
    const auto& l = m->experts.at(kind)[e];
    return in.matmul(l->lora_A.t()).matmul(l->lora_B.t()) * 0.5;
  };
  auto y = torch::zeros({10, 8}, torch::kFloat64);
  for (int64_t e = 0; e < 4; ++e) {
    auto g = x.matmul(wg.t()) + lora("gate_proj", e, x);
    auto u = x.matmul(wu.t()) + lora("up_proj", e, x);
    auto a = torch::silu(g) * u;
    auto ye = a.matmul(mlp->down_proj->weight.t()) + lora("down_proj", e, a);
    y = y + ye * (w * chosen.eq(e)).sum(-1, true);
  }
  const auto dense = run(y);
  for (size_t i = 0; i < fused.size(); ++i) {
    INFO(i);
    REQUIRE(torch::allclose(fused[i], dense[i], 1e-10, 1e-12));
  }
}

TEST_CASE("the MixLoRA auxiliary loss is coef * k under uniform routing and skips padding",
          "[adapters][mixlora]") {
  const int64_t tokens = 12, experts = 8;
  std::vector<torch::Tensor> uniform(3, torch::zeros({tokens, experts}));
  auto keep = torch::ones({tokens}, torch::kBool);
  keep.narrow(0, 9, 3).fill_(false);
  for (int64_t k : {1, 2}) {
    INFO("top " << k);
    REQUIRE(mixlora_aux_loss(uniform, keep, k, 0.01).item<double>() ==
            Approx(0.01 * static_cast<double>(k)).epsilon(1e-6));
  }
  // Collapsed routing costs more; padded rows, whatever their logits, change nothing.
  std::vector<torch::Tensor> skewed;
  for (int i = 0; i < 3; ++i) skewed.push_back(torch::randn({tokens, experts}) * 4);
  const double with_pad = mixlora_aux_loss(skewed, keep, 2, 0.01).item<double>();
  std::vector<torch::Tensor> kept;
  for (auto& z : skewed) kept.push_back(z.narrow(0, 0, 9));
  REQUIRE(with_pad == Approx(mixlora_aux_loss(kept, {}, 2, 0.01).item<double>()).epsilon(1e-6));
  std::vector<torch::Tensor> collapsed(3, torch::zeros({tokens, experts}));
  for (auto& z : collapsed) z.select(1, 0).fill_(20);
  REQUIRE(mixlora_aux_loss(collapsed, {}, 2, 0.01).item<double>() > 0.01 * 2 * 2);
}

TEST_CASE("MixLoRA saves in MoE-PEFT's names and loads back bit for bit", "[adapters][mixlora]") {
  using lorafit::test::fixture;
  auto a = load_llama(fixture("gqa_llama3/model"), torch::kCPU, torch::kFloat32);
  AdapterSettings s;
  s.r = 2, s.alpha = 4;
  s.options["num_experts"] = 3, s.options["top_k"] = 2, s.options["router_aux_loss_coef"] = 0.01;
  // expert_lora overrides
  s.options["expert_r"] = 5, s.options["expert_alpha"] = 10.0, s.options["expert_dropout"] = 0.0;
  s.targets = {"q_proj", "v_proj", "gate_proj", "down_proj"};
  const auto& spec = find_adapter("mixlora");
  spec.attach_new(s, a->adapter_sites());
  for (const auto& site : a->adapter_sites().ffns)
    randomize_experts(*std::dynamic_pointer_cast<MixLoraImpl>(site.adapter()));
  const auto saved = spec.save(s, a->adapter_sites(), "base");
  REQUIRE(saved.config["peft_type"] == "MIXLORA");
  REQUIRE(saved.tensors.count("mixlora.layers.1.mlp.moe_gate.weight"));
  REQUIRE(saved.tensors.count("mixlora.layers.0.mlp.down_proj.experts.2.lora_B.weight"));
  REQUIRE(saved.tensors.count("mixlora.layers.0.self_attn.v_proj.lora_A.weight"));
  REQUIRE(!saved.tensors.count("mixlora.layers.0.mlp.up_proj.experts.0.lora_A.weight"));
  REQUIRE(saved.config["expert_lora"]["r"] == 5);
  REQUIRE(saved.tensors.at("mixlora.layers.0.mlp.gate_proj.experts.1.lora_A.weight").size(0) == 5);
  REQUIRE(saved.tensors.at("mixlora.layers.0.self_attn.q_proj.lora_A.weight").size(0) == 2);

  auto b = load_llama(fixture("gqa_llama3/model"), torch::kCPU, torch::kFloat32);
  spec.attach_saved(saved.config, saved.tensors, b->adapter_sites(), "dir");
  const auto again = spec.save(s, b->adapter_sites(), "base");
  REQUIRE(again.tensors.size() == saved.tensors.size());
  for (const auto& [name, t] : saved.tensors) {
    INFO(name);
    REQUIRE(torch::equal(again.tensors.at(name), t));
  }
  auto ids = torch::randint(0, 300, {2, 9}, torch::kInt64);
  torch::NoGradGuard no_grad;
  REQUIRE(torch::equal(a->forward(ids), b->forward(ids)));

  auto switch_routing = saved.config;
  switch_routing["routing_strategy"] = "mixlora-switch";
  auto c = load_llama(fixture("gqa_llama3/model"), torch::kCPU, torch::kFloat32);
  REQUIRE_THROWS_WITH(spec.attach_saved(switch_routing, saved.tensors, c->adapter_sites(), "dir"),
                      Catch::Contains("routing_strategy") && Catch::Contains("mixlora-switch"));
  auto partial = saved.tensors;
  partial.erase("mixlora.layers.1.mlp.moe_gate.weight");
  auto d = load_llama(fixture("gqa_llama3/model"), torch::kCPU, torch::kFloat32);
  REQUIRE_THROWS_WITH(spec.attach_saved(saved.config, partial, d->adapter_sites(), "dir"),
                      Catch::Contains("missing tensor 'mixlora.layers.1.mlp.moe_gate.weight'"));
}

TEST_CASE("MixLoRA with checkpointed layers gets the gradients of the plain backward",
          "[adapters][mixlora]") {
  // float64, two micro-batches with padding: the auxiliary loss's gradient must reach the
  // routers through the recomputation as it does through the kept graph.
  auto grads = [](bool checkpoint, bool keep_residual) {
    torch::manual_seed(11);
    auto model =
        load_llama(lorafit::test::fixture("gqa_llama3/model"), torch::kCPU, torch::kFloat64);
    AdapterSettings s;
    s.r = 2, s.alpha = 4;
    s.options["num_experts"] = 4, s.options["top_k"] = 2;
    s.options["router_aux_loss_coef"] = 0.5;  // large, so its gradient shows
    s.targets = {"q_proj", "gate_proj", "down_proj"};
    const auto& spec = find_adapter("mixlora");
    const auto sites = model->adapter_sites();
    spec.attach_new(s, sites);
    for (const auto& site : sites.ffns) {
      auto m = std::dynamic_pointer_cast<MixLoraImpl>(site.adapter());
      randomize_experts(*m);
      m->to(torch::kFloat64);
    }
    const auto params = trainable_parameters(model);
    model->train();
    model->checkpoint_layers = checkpoint;
    model->checkpoint_keep.residual = keep_residual;
    std::vector<Batch> batches;
    for (int i = 0; i < 2; ++i) {
      auto ids = torch::randint(3, 320, {2, 7}, torch::kInt64);
      auto keep = torch::ones({2, 7}, torch::kBool);
      keep[1].narrow(0, 5, 2).fill_(false);
      auto labels = ids.masked_fill(keep.logical_not(), -100);
      batches.push_back({ids, labels, 12, keep, {}});
    }
    AuxLoss aux = [&](const torch::Tensor& keep, double scale) {
      return spec.aux_loss(s, sites, keep, scale);
    };
    const auto loss = accumulate_gradients(model, batches, 22, aux);
    std::vector<torch::Tensor> out{loss.nll, loss.aux};
    for (const auto& p : params) out.push_back(p.grad().clone());
    return out;
  };
  const auto plain = grads(false, false);
  for (const bool keep_residual : {false, true}) {
    const auto checkpointed = grads(true, keep_residual);
    REQUIRE(plain.size() == checkpointed.size());
    for (size_t i = 0; i < plain.size(); ++i) {
      INFO(i << ", keeping the residual: " << keep_residual);
      REQUIRE(torch::allclose(plain[i], checkpointed[i], 1e-10, 1e-12));
    }
  }
  // The routers' gradients include the auxiliary loss: without it they would differ.
  REQUIRE(plain[1].item<double>() > 0);
}
