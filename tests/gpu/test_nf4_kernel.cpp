// The NF4 dequantization kernel (core/kernels.cu) against its LibTorch composite, and the
// quantized base GEMM on CUDA against the same GEMMs on the composite's dense weight: the same
// bits, values and input gradients.
#include <catch2/catch.hpp>

#include "core/nf4.h"
#include "core/projection.h"

using namespace lorafit;

TEST_CASE("the NF4 kernel writes the composite's bits in every dtype and layout", "[gpu][nf4]") {
  torch::manual_seed(0);
  // Aligned rows, a partial last block with an odd count, and a weight into a row offset that
  // leaves the 16-byte path (the scalar kernel).
  for (auto shape : {std::vector<int64_t>{4096, 1024}, {3, 23}, {7, 64}}) {
    const auto w = torch::randn(shape, torch::device(torch::kCUDA)) * 0.02;
    const auto q = nf4_quantize(w);
    for (auto dtype : {torch::kBFloat16, torch::kFloat16, torch::kFloat32, torch::kFloat64}) {
      INFO(shape[0] << "x" << shape[1] << " " << dtype);
      auto kernel = torch::empty({shape[0] + 1, shape[1]}, w.options().dtype(dtype));
      auto into = kernel.narrow(0, 1, shape[0]);  // starts one row in
      nf4_dequantize_into(q, into);
      auto composite = torch::empty(shape, w.options().dtype(dtype));
      composite::nf4_dequantize_into(q, composite);
      REQUIRE(torch::equal(into, composite));
      REQUIRE(torch::equal(nf4_dequantize(q, dtype), composite));
    }
  }
  // Quantized on the GPU as on the CPU.
  const auto w = torch::randn({256, 512}) * 0.02;
  const auto cpu = nf4_quantize(w), gpu = nf4_quantize(w.cuda());
  REQUIRE(torch::equal(cpu.packed, gpu.packed.cpu()));
  REQUIRE(torch::equal(cpu.absmax, gpu.absmax.cpu()));
  REQUIRE(torch::allclose(cpu.absmax_scale, gpu.absmax_scale.cpu(), 1e-6, 0));
}

TEST_CASE("the quantized base GEMM gives the dense GEMM's values and input gradients",
          "[gpu][nf4]") {
  torch::manual_seed(1);
  const auto o = torch::device(torch::kCUDA).dtype(torch::kBFloat16);
  const auto q = nf4_quantize(torch::randn({768, 512}, o) * 0.02);
  const auto k = nf4_quantize(torch::randn({256, 512}, o) * 0.02);
  auto dense = torch::empty({1024, 512}, o);
  composite::nf4_dequantize_into(q, dense.narrow(0, 0, 768));
  composite::nf4_dequantize_into(k, dense.narrow(0, 768, 256));
  const auto a = (torch::randn({8, 512}, o.dtype(torch::kFloat32)) * 0.1).requires_grad_(true);
  const auto b = (torch::randn({1024, 8}, o.dtype(torch::kFloat32)) * 0.1).requires_grad_(true);
  const auto x0 = torch::randn({4, 33, 512}, o);
  const auto dy = torch::randn({4, 33, 1024}, o);
  std::vector<std::vector<torch::Tensor>> results;
  for (const BaseWeight& w : {BaseWeight(std::vector<Nf4Weight>{q, k}), BaseWeight(dense)}) {
    const auto x = x0.clone().requires_grad_(true);
    const auto y = low_rank_linear(x, w, LowRank{{{a, b, 2.0}}});
    y.backward(dy);
    results.push_back({y.detach(), x.grad(), a.grad().clone(), b.grad().clone()});
    a.grad().zero_();
    b.grad().zero_();
  }
  for (size_t i = 0; i < results[0].size(); ++i) {
    INFO("output " << i << " (value, dx, dA, dB)");
    REQUIRE(torch::equal(results[0][i], results[1][i]));
  }
}
