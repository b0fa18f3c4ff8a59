// MixLoRA's fast path on CUDA (one base gate/up GEMM, the slots' SwiGLU and mix in one kernel,
// the base down projection once on the mix) against MoE-PEFT's per-expert path, in bf16: both
// are measured against the float64 truth of the same weights.
#include <catch2/catch.hpp>

#include "adapters/mixlora.h"
#include "core/llama.h"
#include "test_util.h"

using namespace lorafit;
using lorafit::test::rel_err_f64;

namespace {

struct Run {
  std::vector<torch::Tensor> values;  // output, then d/dx and the adapter's gradients
};

// An MLP with a MixLoRA whose experts differ, made on CUDA with the same seeded values in
// every dtype: base in `dtype`, adapter in fp32 (as training holds it), or everything float64.
std::pair<Mlp, MixLora> model(torch::Dtype dtype, uint64_t seed) {
  torch::manual_seed(seed);
  const auto adapter_dtype = dtype == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  LlamaConfig c;
  c.hidden_size = 64;
  c.intermediate_size = 136;
  Mlp mlp(c, "model.layers.0.mlp", torch::dtype(dtype).device(torch::kCUDA));
  const std::vector<std::string> kinds = {"gate_proj", "up_proj", "down_proj"};
  MixLora m(64, 136, 8, 2, kinds, 4, 0.5, 0.0, torch::dtype(adapter_dtype).device(torch::kCUDA));
  torch::NoGradGuard g;
  auto fill = [](torch::Tensor t, double std) {
    t.copy_(torch::randn(t.sizes(), torch::kFloat64) * std);
  };
  fill(mlp->gate_up_weight, 0.1);
  fill(mlp->down_proj->weight, 0.1);
  fill(m->moe_gate, 0.3);
  for (auto& [kind, list] : m->experts) {
    for (auto& lora : list) {
      fill(lora->lora_A, 0.1);
      fill(lora->lora_B, 0.1);
    }
  }
  mlp->attach(m.ptr());
  return {mlp, m};
}

Run run(torch::Dtype dtype, bool per_expert, const torch::Tensor& x, const torch::Tensor& dy) {
  auto [mlp, m] = model(dtype, 7);
  m->per_expert_base = per_expert;
  auto xin = x.to(dtype).detach().requires_grad_(true);
  auto y = mlp(xin);
  y.backward(dy.to(dtype));
  Run r{{y.detach(), xin.grad()}};
  // An expert that no token chose gets no gradient on the per-expert path.
  for (const auto& p : m->parameters())
    r.values.push_back(p.grad().defined() ? p.grad() : torch::zeros_like(p));
  return r;
}

}  // namespace

TEST_CASE("MixLoRA's fast path on CUDA is as close to float64 as the per-expert path in bf16",
          "[gpu][mixlora]") {
  REQUIRE(torch::cuda::is_available());
  const auto x = torch::randn({2, 96, 64}, torch::kFloat64).to(torch::kCUDA);
  const auto dy = torch::randn({2, 96, 64}, torch::kFloat64).to(torch::kCUDA);
  const auto truth = run(torch::kFloat64, true, x, dy);
  const auto fast64 = run(torch::kFloat64, false, x, dy);
  const auto fast = run(torch::kBFloat16, false, x, dy);
  const auto per_expert = run(torch::kBFloat16, true, x, dy);
  REQUIRE(fast.values.size() == truth.values.size());
  for (size_t i = 0; i < truth.values.size(); ++i) {
    INFO("value " << i << " (0: output, 1: dx, then the adapter's parameters)");
    REQUIRE(torch::allclose(fast64.values[i], truth.values[i], 1e-9, 1e-11));
    const double ours = rel_err_f64(fast.values[i], truth.values[i]),
                 theirs = rel_err_f64(per_expert.values[i], truth.values[i]);
    INFO("fast path " << ours << ", per-expert path " << theirs);
    REQUIRE(ours <= std::max(2 * theirs, std::pow(2.0, -7)));
  }
}
