#include <catch2/catch.hpp>

#include "adapters/lora.h"
#include "adapters/registry.h"
#include "core/cola.h"
#include "core/errors.h"
#include "core/llama.h"
#include "test_util.h"

using namespace lorafit;
using lorafit::test::fixture;

namespace {

LlamaForCausalLM fixture_model() {
  return load_llama(fixture("gqa_llama3/model"), torch::kCPU, torch::kFloat32);
}

// Trained-looking adapters: no factor or scale at its initial value.
void randomize_b(LlamaForCausalLM& model) {
  torch::NoGradGuard g;
  for (auto p : model->projections())
    if (p->adapter)
      for (auto& t : p->adapter->parameters()) t.normal_(0.0, 0.2);
}

torch::Tensor logits(LlamaForCausalLM model, const torch::Tensor& ids) {
  torch::NoGradGuard g;
  model->eval();
  return model->logits(model->forward(ids));
}

AdapterSettings lora_settings(int64_t r) {
  return {r, 8.0, 0.0, false, {"q_proj", "v_proj", "down_proj"}};
}

}  // namespace

TEST_CASE("cola knots fall on the steps the recipe asks for", "[core][cola]") {
  ColaRecipe c;
  c.links = 3;
  REQUIRE(cola_knot_steps(c, 90) == std::vector<int64_t>{30, 60});
  c.links = 1;
  REQUIRE(cola_knot_steps(c, 90).empty());
  c.links = 0;
  c.knots = {0.6};
  REQUIRE(cola_knot_steps(c, 90) == std::vector<int64_t>{54});
  c.knots = {0.1, 0.12};
  REQUIRE_THROWS_AS(cola_knot_steps(c, 10), ConfigError);  // both on step 1
  c.ranks = {8, 8, 4};
  REQUIRE(cola_link_settings(c, lora_settings(16), 2).r == 4);
  REQUIRE(cola_link_settings(c, lora_settings(16), 2).alpha == 8.0);
}

TEST_CASE("right after a knot the model's outputs are unchanged", "[core][cola]") {
  torch::manual_seed(0);
  auto model = fixture_model();
  const auto& spec = find_adapter("lora");
  spec.attach_new(lora_settings(4), model->adapter_sites());
  randomize_b(model);
  auto chain = start_chain(model);
  const auto ids = torch::randint(3, 320, {2, 9}, torch::kInt64);
  const auto before = logits(model, ids);
  const auto q_before = model->projections()[0]->weight.clone();
  tie_knot(chain, model, spec, lora_settings(4), lora_settings(2), "base");
  REQUIRE(torch::allclose(logits(model, ids), before, 1e-5, 1e-5));
  REQUIRE(!torch::allclose(model->projections()[0]->weight, q_before));  // merged into the base
  for (auto p : model->projections()) {
    if (!p->adapter) continue;
    const auto* lora = p->adapter->as<LoraImpl>();
    REQUIRE(lora->lora_A.size(0) == 2);  // the next link's rank
    REQUIRE(lora->lora_B.abs().sum().item<double>() == 0);
  }
  REQUIRE(chain.links.size() == 1);
  REQUIRE(chain.a.at("model.layers.0.self_attn.q_proj").size(0) == 4);
}

TEST_CASE("the exported rank-sum(r) adapter reproduces the chain", "[core][cola]") {
  for (const std::string type : {"lora", "multilora"}) {
    INFO(type);
    torch::manual_seed(1);
    auto model = fixture_model();
    const auto& spec = find_adapter(type);
    const std::vector<int64_t> ranks{4, 4, 2};
    spec.attach_new(lora_settings(ranks[0]), model->adapter_sites());
    auto chain = start_chain(model);
    const auto ids = torch::randint(3, 320, {2, 9}, torch::kInt64);
    for (size_t j = 0; j + 1 < ranks.size(); ++j) {
      randomize_b(model);
      const auto before = logits(model, ids);
      tie_knot(chain, model, spec, lora_settings(ranks[j]), lora_settings(ranks[j + 1]), "base");
      REQUIRE(torch::allclose(logits(model, ids), before, 1e-5, 1e-5));
    }
    randomize_b(model);  // the last link, still attached
    const auto expected = logits(model, ids);

    // MultiLoRA's links are n = 3 modules of rank r each.
    const int64_t rank = (type == "lora" ? 1 : 3) * (ranks[0] + ranks[1] + ranks[2]);
    const auto exported = chain_adapter(chain, model, lora_settings(ranks.back()), "base");
    REQUIRE(exported.config["peft_type"] == "LORA");
    REQUIRE(exported.config["r"] == rank);
    REQUIRE(exported.config["lora_alpha"] == rank);
    REQUIRE(exported.tensors.at("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight")
                .size(0) == rank);
    auto fresh = fixture_model();
    lora_attach_saved(exported.config, exported.tensors, fresh->projections(), "chain");
    REQUIRE(torch::allclose(logits(fresh, ids), expected, 1e-5, 1e-5));
    REQUIRE(!torch::allclose(logits(fixture_model(), ids), expected, 1e-3, 1e-3));
  }
}
