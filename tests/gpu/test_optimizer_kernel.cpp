// AdamW's two-kernel step on the GPU (core/fused_ops.h) against the multi-tensor ops it replaces,
// run on the CPU on the same values: clipped and not, with weight decay, a tensor without a
// gradient, tensors of several chunks, and a norm summed over (pretend) ranks.
#include <catch2/catch.hpp>
#include <cmath>

#include "core/fused_ops.h"
#include "core/optimizer.h"

using namespace lorafit;

namespace {

// Sizes: below one chunk, odd, and over two chunks of the kernel's 16,384 elements.
std::vector<torch::Tensor> params_on(torch::Device device) {
  torch::manual_seed(5);
  std::vector<torch::Tensor> out;
  for (auto shape : {std::vector<int64_t>{16, 8}, {5}, {3, 2, 4}, {40000}, {128, 300}})
    out.push_back(torch::randn(shape).to(device));
  return out;
}

}  // namespace

TEST_CASE("AdamW's kernels step as the multi-tensor ops do", "[gpu][optimizer]") {
  auto gpu = params_on(torch::kCUDA), cpu = params_on(torch::kCPU);
  AdamWSettings s;
  s.weight_decay = 0.1;
  AdamW on_gpu(gpu, s), on_cpu(cpu, s);
  // Two ranks holding these same gradients: the squared norm doubles.
  const auto two_ranks = [](torch::Tensor sq) { return sq * 2; };
  for (int step = 0; step < 8; ++step) {
    INFO("step " << step);
    for (size_t i = 0; i < cpu.size(); ++i) {
      if (step % 3 == 1 && i == 2) continue;  // no gradient: the tensor keeps its state
      const auto g = torch::randn(cpu[i].sizes()) * (step < 4 ? 3.0 : 1e-3);
      cpu[i].mutable_grad() = g;
      gpu[i].mutable_grad() = g.cuda();
    }
    // Clipped (the early steps' norm is far above 1), not clipped, not asked to clip.
    const double max_norm = step < 4 ? 1.0 : (step < 6 ? 10.0 : 0.0);
    const std::function<torch::Tensor(torch::Tensor)> ranks =
        step == 2 ? std::function<torch::Tensor(torch::Tensor)>(two_ranks) : nullptr;
    std::vector<int64_t> versions;
    for (const auto& t : gpu) versions.push_back(t._version());
    const auto norm_gpu = on_gpu.step(1e-2, max_norm, ranks);
    const auto norm_cpu = on_cpu.step(1e-2, max_norm, ranks);
    REQUIRE(norm_gpu.defined() == (max_norm > 0));
    if (max_norm > 0)
      REQUIRE(norm_gpu.item<double>() == Approx(norm_cpu.item<double>()).epsilon(1e-5));
    for (size_t i = 0; i < cpu.size(); ++i) {
      INFO("tensor " << i);
      REQUIRE(!gpu[i].grad().defined());
      // The factors' cached copies are made anew when the version moves.
      const bool moved = gpu[i]._version() > versions[i];
      REQUIRE(moved == !(step % 3 == 1 && i == 2));
      REQUIRE(torch::allclose(gpu[i].cpu(), cpu[i], 1e-5, 1e-6));
      REQUIRE(torch::allclose(on_gpu.exp_avg[i].cpu(), on_cpu.exp_avg[i], 1e-5, 1e-7));
      REQUIRE(torch::allclose(on_gpu.exp_avg_sq[i].cpu(), on_cpu.exp_avg_sq[i], 1e-5, 1e-9));
    }
  }
  REQUIRE(on_gpu.steps == on_cpu.steps);
}

TEST_CASE("AdamW's kernels run for fp32 contiguous CUDA tensors only", "[gpu][optimizer]") {
  const AdamWUpdate u{1e-3, 0.9, 0.999, 1e-8, 0.0, 0.1, 0.001, 1.0};
  auto run = [&](const torch::Tensor& p) {
    auto g = torch::ones_like(p), m = torch::zeros_like(p), v = torch::zeros_like(p);
    torch::Tensor norm;
    return adamw_kernel_step({p}, {g}, {m}, {v}, u, nullptr, norm);
  };
  const auto p = torch::randn({64, 32}, torch::device(torch::kCUDA));
  REQUIRE(run(p));
  REQUIRE(!run(p.t()));  // not contiguous
  REQUIRE(!run(p.to(torch::kBFloat16)));
  REQUIRE(!run(p.cpu()));
}

TEST_CASE("AdamW's kernels spread a NaN gradient through clipping as clip_grad_norm_ does",
          "[gpu][optimizer]") {
  for (auto device : {torch::Device(torch::kCPU), torch::Device(torch::kCUDA)}) {
    INFO(device);
    auto params = params_on(device);
    AdamW adamw(params, AdamWSettings{});
    for (auto& p : params) p.mutable_grad() = torch::ones_like(p);
    params[1].mutable_grad()[0] = std::nan("");
    const auto norm = adamw.step(1e-2, 1.0);
    REQUIRE(std::isnan(norm.item<double>()));
    for (const auto& p : params) REQUIRE(p.isnan().all().item<bool>());
  }
}
