#include <catch2/catch.hpp>

#include "adapters/dora.h"
#include "adapters/lora.h"
#include "adapters/registry.h"
#include "core/errors.h"
#include "test_util.h"

using namespace lorafit;

namespace {

// A DoRA in float64 with B and m moved away from their start, so that every term shows.
Dora moved_dora(const ProjectionImpl& p, int64_t r, double scaling, double dropout = 0.0) {
  auto dora = Dora(p, r, scaling, dropout);
  torch::NoGradGuard g;
  for (auto& t : dora->parameters()) t.set_data(t.to(torch::kFloat64));
  dora->lora_B.normal_();
  dora->lora_magnitude_vector.mul_(1 + 0.3 * torch::randn_like(dora->lora_magnitude_vector));
  return dora;
}

// The dense composite that DoRA's definition gives: W' = m / ||W + s B A||_row (detached) *
// (W + s B A), y = x W'^T. x: [..., in] -> [..., out]
torch::Tensor dense_dora(const torch::Tensor& x, const ProjectionImpl& p, const DoraImpl& d) {
  const auto updated = p.weight + d.scaling * torch::matmul(d.lora_B, d.lora_A);
  const auto norm = updated.norm(2, {1}, /*keepdim=*/true).detach();
  return torch::matmul(x, (d.lora_magnitude_vector.unsqueeze(1) / norm * updated).t());
}

}  // namespace

TEST_CASE("a fresh DoRA leaves the projection's output unchanged", "[adapters][dora]") {
  torch::manual_seed(0);
  auto p = Projection("model.layers.0.self_attn.q_proj", 6, 5, torch::kFloat32);
  {
    torch::NoGradGuard g;
    p->weight.normal_();
  }
  auto x = torch::randn({2, 3, 6});
  const auto before = p(x);
  auto dora = Dora(*p, 4, 2.0, 0.0);
  REQUIRE(torch::allclose(dora->lora_magnitude_vector, p->weight.norm(2, {1})));
  p->attach(dora.ptr());
  REQUIRE(torch::allclose(p(x), before, 1e-6, 1e-6));
}

TEST_CASE("DoRA's fused projection has the dense composite's gradients in float64",
          "[adapters][dora]") {
  torch::manual_seed(1);
  // q and v with DoRA (v with a bias, added after the rescaling), k plain, on one stacked
  // weight: the group runs one base GEMM with each DoRA's scale on its own columns.
  auto stacked = torch::randn({5 + 3 + 4, 6}, torch::kFloat64);
  const auto bias = torch::randn({4}, torch::kFloat64);
  Projections ps;
  int64_t row = 0;
  for (auto [name, out] :
       std::vector<std::pair<std::string, int64_t>>{{"q_proj", 5}, {"k_proj", 3}, {"v_proj", 4}}) {
    ps.push_back(Projection(name, 6, out, torch::kFloat64, stacked.narrow(0, row, out),
                            name == "v_proj" ? bias : torch::Tensor()));
    row += out;
  }
  auto dq = moved_dora(*ps[0], 2, 0.75);
  auto dv = moved_dora(*ps[2], 3, 1.5);
  ps[0]->attach(dq.ptr());
  ps[2]->attach(dv.ptr());
  auto x = torch::randn({2, 3, 6}, torch::kFloat64).requires_grad_(true);
  auto upstream = torch::randn({2, 3, 12}, torch::kFloat64);
  const std::vector<torch::Tensor> inputs{x,
                                          dq->lora_A,
                                          dq->lora_B,
                                          dq->lora_magnitude_vector,
                                          dv->lora_A,
                                          dv->lora_B,
                                          dv->lora_magnitude_vector};
  auto run = [&](const torch::Tensor& y) { return test::value_and_grads(y, upstream, inputs); };
  const auto dense = run(
      torch::cat({dense_dora(x, *ps[0], *dq), ps[1](x), dense_dora(x, *ps[2], *dv) + bias}, -1));
  const auto grouped = run(project_group(x, stacked, {ps[0].get(), ps[1].get(), ps[2].get()},
                                         torch::cat({torch::zeros({8}, torch::kFloat64), bias})));
  const auto separate = run(torch::cat({ps[0](x), ps[1](x), ps[2](x)}, -1));
  ps[0]->eval();  // the plain-autograd path that eval of one job's rows takes
  const auto plain = run(torch::cat(
      {adapted_output(*dq, x, torch::matmul(x, ps[0]->weight.t())), ps[1](x), ps[2](x)}, -1));
  for (size_t i = 0; i < dense.size(); ++i) {
    INFO(i);
    REQUIRE(torch::allclose(grouped[i], dense[i], 1e-10, 1e-12));
    REQUIRE(torch::allclose(separate[i], dense[i], 1e-10, 1e-12));
    REQUIRE(torch::allclose(plain[i], dense[i], 1e-10, 1e-12));
  }
  // The norm is a constant: m's gradient is dy . (x W'^T) / m, column by column.
  REQUIRE(dense[4].abs().sum().item<double>() > 0);
}

TEST_CASE("DoRA dropout is PEFT's: the base term keeps the undropped input", "[adapters][dora]") {
  torch::manual_seed(2);
  auto p = Projection("q_proj", 8, 5, torch::kFloat64);
  {
    torch::NoGradGuard g;
    p->weight.normal_();
  }
  auto dora = moved_dora(*p, 3, 0.5, /*dropout=*/0.5);
  p->attach(dora.ptr());
  auto x = torch::randn({4, 8}, torch::kFloat64);
  p->train();
  torch::manual_seed(7);
  const auto y = p(x);
  torch::manual_seed(7);
  const auto h = torch::dropout(x, 0.5, true);
  const auto g = dora->column_scale().detach();
  const auto w = p->weight;
  const auto expected = x.matmul(w.t()) + (g - 1) * h.matmul(w.t()) +
                        g * 0.5 * h.matmul(dora->lora_A.t()).matmul(dora->lora_B.t());
  REQUIRE(torch::allclose(y, expected, 1e-10, 1e-12));
  p->eval();
  REQUIRE(torch::allclose(p(x), dense_dora(x, *p, *dora), 1e-10, 1e-12));
}

TEST_CASE("DoRA merges to its own outputs and saves and loads in PEFT's format",
          "[adapters][dora]") {
  torch::manual_seed(3);
  auto p = Projection("model.layers.0.mlp.down_proj", 6, 5, torch::kFloat32);
  {
    torch::NoGradGuard g;
    p->weight.normal_();
  }
  const auto& spec = find_adapter("dora");
  AdapterSettings s;
  s.r = 2, s.alpha = 4, s.use_rslora = true, s.targets = {"down_proj"};
  const AdapterSites sites{{p}, {}};
  spec.attach_new(s, sites);
  auto* dora = p->adapter->as<DoraImpl>();
  REQUIRE(dora->scaling == Approx(4 / std::sqrt(2.0)));
  {
    torch::NoGradGuard g;
    dora->lora_B.normal_();
    dora->lora_magnitude_vector.mul_(1.5);
  }
  auto x = torch::randn({3, 6});
  const auto y = p(x).detach();
  REQUIRE(torch::allclose(x.matmul((p->weight + dora->merged_delta()).t()), y, 1e-5, 1e-5));

  const auto saved = spec.save(s, sites, "base");
  REQUIRE(saved.config["peft_type"] == "LORA");
  REQUIRE(saved.config["use_dora"] == true);
  REQUIRE(saved.config["use_rslora"] == true);
  const std::string m_key = "base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector";
  REQUIRE(saved.tensors.at(m_key).sizes() == std::vector<int64_t>{5});
  REQUIRE(&find_adapter_for_config(saved.config, "cfg") == &spec);
  auto plain_lora = saved.config;
  plain_lora["use_dora"] = false;
  REQUIRE(find_adapter_for_config(plain_lora, "cfg").name == "lora");

  auto q = Projection("model.layers.0.mlp.down_proj", 6, 5, torch::kFloat32);
  {
    torch::NoGradGuard g;
    q->weight.copy_(p->weight);
  }
  spec.attach_saved(saved.config, saved.tensors, {{q}, {}}, "dir");
  REQUIRE(torch::equal(q(x), y));

  auto missing = saved.tensors;
  missing.erase(m_key);
  REQUIRE_THROWS_WITH(
      spec.attach_saved(saved.config, missing, {{q}, {}}, "dir"),
      Catch::Contains("missing tensor '" + m_key + "'") && Catch::Contains("m-LoRA writes none"));
  auto wrong = saved.tensors;
  wrong[m_key] = torch::ones({4});
  REQUIRE_THROWS_WITH(spec.attach_saved(saved.config, wrong, {{q}, {}}, "dir"),
                      Catch::Contains("lora_magnitude_vector' [4] does not fit"));
}
