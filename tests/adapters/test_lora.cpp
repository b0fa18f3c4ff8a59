#include <catch2/catch.hpp>

#include "adapters/lora.h"
#include "adapters/multilora.h"
#include "adapters/registry.h"
#include "core/errors.h"
#include "test_util.h"

using namespace lorafit;

namespace {

Projections make_projections(const std::vector<std::string>& names, int64_t in, int64_t out) {
  Projections ps;
  torch::manual_seed(0);
  for (const auto& n : names) {
    ps.push_back(Projection(n, in, out, torch::kFloat32));
    torch::NoGradGuard g;
    ps.back()->weight.normal_();
  }
  return ps;
}

TensorMap lora_weights(const Projections& ps, int64_t r) {
  TensorMap w;
  for (const auto& p : ps) {
    w["base_model.model." + p->name + ".lora_A.weight"] = torch::randn({r, p->in_features});
    w["base_model.model." + p->name + ".lora_B.weight"] = torch::randn({p->out_features, r});
  }
  return w;
}

nlohmann::json lora_config(nlohmann::json targets) {
  return {{"peft_type", "LORA"}, {"r", 4}, {"lora_alpha", 8}, {"target_modules", targets}};
}

}  // namespace

TEST_CASE("a fresh LoRA leaves the projection's output unchanged", "[adapters][lora]") {
  auto ps = make_projections({"model.layers.0.self_attn.q_proj"}, 6, 5);
  auto x = torch::randn({2, 3, 6});
  auto before = ps[0](x);
  ps[0]->attach(Lora(6, 5, 4, 2.0, 0.0, torch::kFloat32).ptr());
  REQUIRE(torch::equal(ps[0](x), before));
}

TEST_CASE("LoRA forward is x W^T + s B A x with fp32 weights computed in a bf16 base's dtype",
          "[adapters][lora]") {
  auto ps = make_projections({"q_proj"}, 6, 5);
  auto lora = Lora(6, 5, 3, /*scaling=*/0.75, 0.0, torch::kFloat32);
  {
    torch::NoGradGuard g;
    lora->lora_B.normal_();
  }
  ps[0]->attach(lora.ptr());
  auto x = torch::randn({4, 6});
  auto expected =
      x.matmul(ps[0]->weight.t()) + 0.75 * x.matmul(lora->lora_A.t()).matmul(lora->lora_B.t());
  REQUIRE(torch::allclose(ps[0](x), expected, 1e-5, 1e-6));

  auto bf16 = Projection("q_proj", 6, 5, torch::kBFloat16);
  {
    torch::NoGradGuard g;
    bf16->weight.copy_(ps[0]->weight);
  }
  bf16->attach(lora.ptr());
  auto y = bf16(x.to(torch::kBFloat16));
  REQUIRE(y.scalar_type() == torch::kBFloat16);
  REQUIRE(lora->lora_A.scalar_type() == torch::kFloat32);
}

TEST_CASE("the fused low-rank projection has the composite's gradients in float64",
          "[adapters][lora]") {
  auto x = torch::randn({2, 3, 6}, torch::kFloat64).requires_grad_(true);
  auto w = torch::randn({5, 6}, torch::kFloat64).requires_grad_(true);
  auto a = torch::randn({3, 6}, torch::kFloat64).requires_grad_(true);
  auto b = torch::randn({5, 3}, torch::kFloat64).requires_grad_(true);
  auto upstream = torch::randn({2, 3, 5}, torch::kFloat64);
  auto grads = [&](const torch::Tensor& y) {
    return test::value_and_grads(y, upstream, {x, w, a, b});
  };
  const auto fused = grads(low_rank_linear(x, w, LowRank{{{a, b, 0.75}}}));
  const auto plain = grads(x.matmul(w.t()) + 0.75 * x.matmul(a.t()).matmul(b.t()));
  for (size_t i = 0; i < fused.size(); ++i) {
    INFO(i);
    REQUIRE(torch::allclose(fused[i], plain[i], 1e-10, 1e-12));
  }
}

TEST_CASE("terms on some output columns: two on the same ones add up, the rest is the base's",
          "[adapters][lora]") {
  // The update is written before the base GEMM adds onto it, so a column no term covers must
  // still be written: freed memory of the output's size full of NaN would show if it is not.
  const auto f64 = torch::kFloat64;
  auto x = torch::randn({4, 6}, f64).requires_grad_(true);
  const auto w = torch::randn({12, 6}, f64);
  std::vector<torch::Tensor> factors{torch::randn({2, 6}, f64), torch::randn({5, 2}, f64),
                                     torch::randn({3, 6}, f64), torch::randn({5, 3}, f64),
                                     torch::randn({2, 6}, f64), torch::randn({4, 2}, f64)};
  for (auto& f : factors) f.requires_grad_(true);
  LowRank u;
  u.terms = {LowRankTerm(factors[0], factors[1], 0.5), LowRankTerm(factors[2], factors[3], 2.0),
             LowRankTerm(factors[4], factors[5], 1.5)};
  u.terms[2].col = 8;
  const auto upstream = torch::randn({4, 12}, f64);
  auto inputs = factors;
  inputs.insert(inputs.begin(), x);
  auto grads = [&](const torch::Tensor& y) { return test::value_and_grads(y, upstream, inputs); };
  auto term = [&](int i, double s) {
    return s * x.matmul(factors[2 * i].t()).matmul(factors[2 * i + 1].t());
  };
  for (int poison = 0; poison < 4; ++poison) torch::full({4, 12}, NAN, f64);
  const auto fused = grads(low_rank_linear(x, w, u));
  const auto plain =
      grads(x.matmul(w.t()) +
            torch::cat({term(0, 0.5) + term(1, 2.0), torch::zeros({4, 3}, f64), term(2, 1.5)}, 1));
  for (size_t i = 0; i < fused.size(); ++i) {
    INFO(i);
    REQUIRE(torch::allclose(fused[i], plain[i], 1e-10, 1e-12));
  }
}

TEST_CASE("a group of projections equals each projection on its own, with gradients",
          "[adapters][lora]") {
  // q with LoRA, k with none, v with MultiLoRA, over one stacked weight, in float64.
  auto stacked = torch::randn({5 + 3 + 4, 6}, torch::kFloat64);
  Projections ps;
  int64_t row = 0;
  for (auto [name, out] :
       std::vector<std::pair<std::string, int64_t>>{{"q_proj", 5}, {"k_proj", 3}, {"v_proj", 4}}) {
    ps.push_back(Projection(name, 6, out, torch::kFloat64, stacked.narrow(0, row, out)));
    row += out;
  }
  auto lora = Lora(6, 5, 2, 0.75, 0.0, torch::kFloat64);
  auto multi = MultiLora(6, 4, 2, 3, 1.5, 0.0, /*vector_scale=*/true, torch::kFloat64);
  {
    torch::NoGradGuard g;
    lora->lora_B.normal_();
    multi->scale.normal_();
  }
  ps[0]->attach(lora.ptr());
  ps[2]->attach(multi.ptr());
  auto x = torch::randn({2, 3, 6}, torch::kFloat64).requires_grad_(true);
  auto upstream = torch::randn({2, 3, 12}, torch::kFloat64);
  const std::vector<torch::Tensor> inputs{
      x, lora->lora_A, lora->lora_B, multi->lora_A, multi->lora_B, multi->scale};
  auto run = [&](const torch::Tensor& y) { return test::value_and_grads(y, upstream, inputs); };
  const auto grouped = run(project_group(x, stacked, {ps[0].get(), ps[1].get(), ps[2].get()}));
  const auto separate = run(torch::cat({ps[0](x), ps[1](x), ps[2](x)}, -1));
  for (size_t i = 0; i < grouped.size(); ++i) {
    INFO(i);
    REQUIRE(torch::allclose(grouped[i], separate[i], 1e-10, 1e-12));
  }
}

TEST_CASE("LoRA dropout reaches only the adapter's input, in training only", "[adapters][lora]") {
  auto ps = make_projections({"q_proj"}, 8, 5);
  auto lora = Lora(8, 5, 3, 0.5, /*dropout=*/0.5, torch::kFloat32);
  {
    torch::NoGradGuard g;
    lora->lora_B.normal_();
  }
  ps[0]->attach(lora.ptr());
  auto x = torch::randn({4, 8});
  ps[0]->train();
  torch::manual_seed(7);
  auto y = ps[0](x);
  torch::manual_seed(7);
  auto dropped = torch::dropout(x, 0.5, true);
  auto expected =
      x.matmul(ps[0]->weight.t()) + 0.5 * dropped.matmul(lora->lora_A.t()).matmul(lora->lora_B.t());
  REQUIRE(torch::allclose(y, expected, 1e-5, 1e-6));
  ps[0]->eval();
  auto plain =
      x.matmul(ps[0]->weight.t()) + 0.5 * x.matmul(lora->lora_A.t()).matmul(lora->lora_B.t());
  REQUIRE(torch::allclose(ps[0](x), plain, 1e-5, 1e-6));
  REQUIRE(!torch::allclose(y, plain, 1e-3, 1e-3));
}

TEST_CASE("target_modules select projections by PEFT's rules", "[adapters][lora]") {
  const std::vector<std::string> names = {"model.layers.0.self_attn.q_proj",
                                          "model.layers.0.self_attn.v_proj",
                                          "model.layers.0.mlp.up_proj"};
  // The file holds tensors for exactly the expected projections, so selecting more (a missing
  // tensor) or fewer (an unused tensor) throws.
  auto expect_selected = [&](const nlohmann::json& targets, const std::vector<size_t>& expected) {
    INFO(targets.dump());
    auto ps = make_projections(names, 4, 4);
    Projections chosen;
    for (auto i : expected) chosen.push_back(ps[i]);
    REQUIRE_NOTHROW(lora_attach_saved(lora_config(targets), lora_weights(chosen, 2), ps, "t"));
    for (size_t i = 0; i < ps.size(); ++i) {
      const bool want = std::find(expected.begin(), expected.end(), i) != expected.end();
      REQUIRE(static_cast<bool>(ps[i]->adapter) == want);
    }
  };
  expect_selected({"q_proj", "up_proj"}, {0, 2});
  expect_selected(".*self_attn\\.(q|v)_proj", {0, 1});
  expect_selected("all-linear", {0, 1, 2});
  auto ps = make_projections(names, 4, 4);
  REQUIRE_THROWS_WITH(lora_attach_saved(lora_config({"proj"}), {}, ps, "t"),
                      Catch::Contains("select no projection"));  // a suffix must follow a dot
}

TEST_CASE("rsLoRA and alpha_pattern set the scaling", "[adapters][lora]") {
  auto ps =
      make_projections({"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"}, 4, 4);
  auto config = lora_config({"q_proj", "up_proj"});
  config["use_rslora"] = true;
  config["alpha_pattern"] = {{"up_proj", 32}};
  lora_attach_saved(config, lora_weights(ps, 4), ps, "t");
  REQUIRE(ps[0]->adapter->as<LoraImpl>()->scaling == Approx(8.0 / 2.0));
  REQUIRE(ps[1]->adapter->as<LoraImpl>()->scaling == Approx(32.0 / 2.0));
}

TEST_CASE("an adapter for another model is refused with the tensors named", "[adapters][lora]") {
  auto ps = make_projections({"model.layers.0.self_attn.q_proj"}, 4, 4);
  auto other = make_projections(
      {"model.layers.0.self_attn.q_proj", "model.layers.5.self_attn.q_proj"}, 8, 4);
  REQUIRE_THROWS_WITH(
      lora_attach_saved(lora_config({"q_proj"}), lora_weights(other, 2), ps, "dir"),
      Catch::Contains("lora_A.weight' [2, 8]") &&
          Catch::Contains("'base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight' "
                          "matches no targeted projection"));
}

TEST_CASE("unsupported adapter options and unknown types are refused", "[adapters][lora]") {
  auto ps = make_projections({"q_proj"}, 4, 4);
  auto config = lora_config({"q_proj"});
  config["use_dora"] = true;
  REQUIRE_THROWS_WITH(lora_attach_saved(config, lora_weights(ps, 2), ps, "d"),
                      Catch::Contains("'use_dora'"));
  REQUIRE_THROWS_WITH(find_adapter_for_config({{"peft_type", "IA3"}}, "cfg"),
                      Catch::Contains("known: LORA"));
}

TEST_CASE("the factors' bf16 copies follow every update of the fp32 parameters",
          "[adapters][lora]") {
  // A bf16 group (q, k with LoRA on one stacked weight) reads its fp32 factors through copies
  // made once per change: every in-place update (the optimizer's foreach step, a copy) must
  // reach the next forward, stacked a's included.
  auto stacked = torch::randn({5 + 3, 6}).to(torch::kBFloat16);
  auto q = Projection("q_proj", 6, 5, torch::kBFloat16, stacked.narrow(0, 0, 5));
  auto k = Projection("k_proj", 6, 3, torch::kBFloat16, stacked.narrow(0, 5, 3));
  auto lq = Lora(6, 5, 2, 0.75, 0.0, torch::kFloat32),
       lk = Lora(6, 3, 2, 0.5, 0.0, torch::kFloat32);
  q->attach(lq.ptr());
  k->attach(lk.ptr());
  const auto x = torch::randn({4, 6}).to(torch::kBFloat16);
  auto composite = [&] {
    const auto f = [&](const torch::Tensor& w, Lora& l, double s) {
      const auto a = l->lora_A.to(torch::kBFloat16), b = l->lora_B.to(torch::kBFloat16);
      return x.matmul(w.t()) + x.matmul(a.t()).matmul(b.t()) * s;
    };
    return torch::cat({f(stacked.narrow(0, 0, 5), lq, 0.75), f(stacked.narrow(0, 5, 3), lk, 0.5)},
                      -1);
  };
  auto grouped = [&] { return project_group(x, stacked, {q.get(), k.get()}).detach(); };
  const auto first = grouped();
  REQUIRE(torch::allclose(first.to(torch::kFloat32), composite().to(torch::kFloat32), 5e-2, 1e-1));
  {
    torch::NoGradGuard g;
    std::vector<torch::Tensor> ps{lq->lora_A, lq->lora_B, lk->lora_A, lk->lora_B};
    at::_foreach_add_(ps, 1.0);
  }
  const auto second = grouped();
  REQUIRE(!torch::allclose(second, first));
  REQUIRE(torch::allclose(second.to(torch::kFloat32), composite().to(torch::kFloat32), 5e-2, 1e-1));
  {
    torch::NoGradGuard g;
    lk->lora_A.copy_(torch::randn({2, 6}));
  }
  const auto third = grouped();
  REQUIRE(!torch::allclose(third, second));
  REQUIRE(torch::allclose(third.to(torch::kFloat32), composite().to(torch::kFloat32), 5e-2, 1e-1));
  // The gradients still reach the fp32 parameters in fp32.
  project_group(x, stacked, {q.get(), k.get()}).sum().backward();
  REQUIRE(lk->lora_A.grad().scalar_type() == torch::kFloat32);
  REQUIRE(lq->lora_B.grad().defined());
}
