#include <catch2/catch.hpp>

#include "adapters/multilora.h"
#include "test_util.h"

using namespace lorafit;

namespace {

Projection projection(const std::string& name,
                      int64_t in,
                      int64_t out,
                      torch::Dtype dtype = torch::kFloat32) {
  auto p = Projection(name, in, out, dtype);
  torch::NoGradGuard g;
  p->weight.normal_();
  return p;
}

// Non-zero scales, so the adapter does something.
void randomize_scales(MultiLoraImpl& m) {
  torch::NoGradGuard g;
  m.scale.normal_();
}

}  // namespace

TEST_CASE("a fresh MultiLoRA leaves the projection unchanged though B is not zero",
          "[adapters][multilora]") {
  auto p = projection("q_proj", 6, 5);
  auto x = torch::randn({2, 3, 6});
  const auto before = p(x);
  auto m = MultiLora(6, 5, /*r=*/2, /*n=*/3, 2.0, 0.0, /*vector_scale=*/true, torch::kFloat32);
  REQUIRE(m->lora_B.abs().sum().item<double>() > 0);
  REQUIRE(m->scale.sizes() == torch::IntArrayRef({3, 5}));
  p->attach(m.ptr());
  REQUIRE(torch::equal(p(x), before));
}

TEST_CASE("MultiLoRA gradients match a float64 composite", "[adapters][multilora]") {
  for (bool vector_scale : {true, false}) {
    INFO(vector_scale);
    auto p = projection("q_proj", 6, 5, torch::kFloat64);
    auto m = MultiLora(6, 5, 2, 3, 0.5, 0.0, vector_scale, torch::kFloat32);
    m->to(torch::kFloat64);
    randomize_scales(*m);
    p->attach(m.ptr());
    auto x = torch::randn({4, 6}, torch::kFloat64).requires_grad_(true);
    p(x).pow(2).sum().backward();
    const auto gA = m->lora_A.grad().clone(), gB = m->lora_B.grad().clone(),
               gS = m->scale.grad().clone(), gx = x.grad().clone();
    for (auto* t : {&m->lora_A, &m->lora_B, &m->scale, &x}) t->mutable_grad().reset();
    // y = x W^T + scaling * sum_i (x A_i^T B_i^T) * s_i, one module at a time.
    auto y = x.matmul(p->weight.t());
    for (int64_t i = 0; i < 3; ++i)
      y = y + 0.5 * x.matmul(m->lora_A[i].t()).matmul(m->lora_B[i].t()) * m->scale[i];
    y.pow(2).sum().backward();
    REQUIRE(torch::allclose(gA, m->lora_A.grad(), 1e-10, 1e-12));
    REQUIRE(torch::allclose(gB, m->lora_B.grad(), 1e-10, 1e-12));
    REQUIRE(torch::allclose(gS, m->scale.grad(), 1e-10, 1e-12));
    REQUIRE(torch::allclose(gx, x.grad(), 1e-10, 1e-12));
  }
}

TEST_CASE("merged MultiLoRA equals unmerged", "[adapters][multilora]") {
  auto p = projection("q_proj", 6, 5);
  auto m = MultiLora(6, 5, 2, 3, 0.75, 0.0, true, torch::kFloat32);
  randomize_scales(*m);
  p->attach(m.ptr());
  auto x = torch::randn({4, 6});
  auto merged = torch::nn::functional::linear(x, p->weight + m->merged_delta());
  REQUIRE(torch::allclose(p(x), merged, 1e-5, 1e-5));
}

TEST_CASE("MultiLoRA saves and loads back bit for bit", "[adapters][multilora]") {
  const std::vector<std::string> names = {"model.layers.0.self_attn.q_proj",
                                          "model.layers.0.mlp.up_proj"};
  Projections a{projection(names[0], 6, 5), projection(names[1], 6, 7)};
  AdapterSettings s;
  s.r = 2, s.alpha = 4, s.targets = {"q_proj", "up_proj"};
  s.options["n"] = 3, s.options["scale"] = "scalar";
  multilora_attach_new(s, a);
  for (auto& p : a) randomize_scales(*p->adapter->as<MultiLoraImpl>());
  const auto saved = multilora_save(s, a, "base");
  REQUIRE(saved.config["peft_type"] == "MULTILORA");
  REQUIRE(saved.tensors.size() == 2 * 3 * 3);
  REQUIRE(saved.tensors.at("base_model.model.model.layers.0.mlp.up_proj.lora_scale.2").sizes() ==
          torch::IntArrayRef({1}));

  Projections b{projection(names[0], 6, 5), projection(names[1], 6, 7)};
  multilora_attach_saved(saved.config, saved.tensors, b, "dir");
  const auto again = multilora_save(s, b, "base");
  for (const auto& [name, t] : saved.tensors) {
    INFO(name);
    REQUIRE(torch::equal(again.tensors.at(name), t));
  }
  auto x = torch::randn({3, 6});
  for (size_t i = 0; i < a.size(); ++i) {
    {
      torch::NoGradGuard g;
      b[i]->weight.copy_(a[i]->weight);
    }
    REQUIRE(torch::equal(a[i](x), b[i](x)));
  }
  Projections other{projection(names[0], 8, 5)};
  REQUIRE_THROWS_WITH(
      multilora_attach_saved(saved.config, saved.tensors, other, "dir"),
      Catch::Contains("has shape") && Catch::Contains("matches no targeted projection"));
}
