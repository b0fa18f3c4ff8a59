// core/kernels.cu against the LibTorch composites it replaces (core/fused_ops.h), on CUDA:
// float64 values and gradients to rounding error, bf16 within one rounding of the composite.
#include <catch2/catch.hpp>

#include "core/fused_ops.h"
#include "test_util.h"

using namespace lorafit;
using lorafit::test::rel_err_f64;

namespace {

// Runs f on fresh leaf copies of `inputs`, backpropagates `upstream`, returns output and grads.
template <typename F>
std::vector<torch::Tensor> value_and_grads(F f,
                                           const std::vector<torch::Tensor>& inputs,
                                           const torch::Tensor& upstream) {
  std::vector<torch::Tensor> leaves;
  for (const auto& t : inputs) leaves.push_back(t.detach().clone().requires_grad_(true));
  auto out = f(leaves);
  out.backward(upstream);
  std::vector<torch::Tensor> result{out.detach()};
  for (const auto& l : leaves) result.push_back(l.grad());
  return result;
}

// float64: the kernel equals the composite to rounding error. bf16: the kernel is no further
// from the float64 truth than the bf16 composite is, give or take one bf16 rounding.
void check(const std::vector<torch::Tensor>& fused,
           const std::vector<torch::Tensor>& plain,
           const std::vector<torch::Tensor>& truth,
           torch::Dtype dtype) {
  REQUIRE(fused.size() == plain.size());
  for (size_t i = 0; i < fused.size(); ++i) {
    INFO("output " << i << " (0: value, then input gradients)");
    REQUIRE(fused[i].sizes() == plain[i].sizes());
    if (dtype == torch::kFloat64) {
      REQUIRE(torch::allclose(fused[i], plain[i], 1e-10, 1e-12));
    } else {
      REQUIRE(rel_err_f64(fused[i], truth[i]) <=
              std::max(2 * rel_err_f64(plain[i], truth[i]), std::pow(2.0, -8)));
    }
  }
}

torch::Tensor f64(const torch::Tensor& t) {
  return t.to(torch::kFloat64);
}

torch::Tensor cuda_randn(torch::IntArrayRef shape, torch::Dtype dtype) {
  return torch::randn(shape, torch::dtype(torch::kFloat64)).to(torch::kCUDA, dtype);
}

}  // namespace

TEST_CASE("fused RMSNorm equals the composite with its gradients on CUDA", "[gpu][kernels]") {
  REQUIRE(torch::cuda::is_available());
  torch::manual_seed(0);
  for (auto dtype : {torch::kFloat64, torch::kBFloat16}) {
    auto x = cuda_randn({3, 37, 300}, dtype);  // 300: not a multiple of the block
    auto w = cuda_randn({300}, dtype);
    auto dy = cuda_randn({3, 37, 300}, dtype);
    REQUIRE(fused_kernels_for(x));
    auto run = [](auto norm) {
      return [norm](const std::vector<torch::Tensor>& in) { return norm(in[0], in[1], 1e-5); };
    };
    check(value_and_grads(run(rms_norm), {x, w}, dy),
          value_and_grads(run(composite::rms_norm), {x, w}, dy),
          value_and_grads(run(composite::rms_norm), {f64(x), f64(w)}, f64(dy)), dtype);
  }
}

TEST_CASE("fused SwiGLU equals the composite with its gradients on CUDA", "[gpu][kernels]") {
  REQUIRE(torch::cuda::is_available());
  torch::manual_seed(1);
  for (auto dtype : {torch::kFloat64, torch::kBFloat16}) {
    for (int64_t i : {128, 131}) {  // 16-byte rows and not
      INFO("intermediate " << i);
      auto gu = cuda_randn({4, 33, 2 * i}, dtype) * 3, dy = cuda_randn({4, 33, i}, dtype);
      auto run = [](auto op) {
        return [op](const std::vector<torch::Tensor>& in) { return op(in[0]); };
      };
      check(value_and_grads(run(swiglu), {gu}, dy),
            value_and_grads(run(composite::swiglu), {gu}, dy),
            value_and_grads(run(composite::swiglu), {f64(gu)}, f64(dy)), dtype);
    }
  }
}

TEST_CASE("fused MixLoRA slots' SwiGLU and mix equal the composite with gradients on CUDA",
          "[gpu][kernels]") {
  REQUIRE(torch::cuda::is_available());
  torch::manual_seed(4);
  const int64_t n = 37;
  for (auto dtype : {torch::kFloat64, torch::kBFloat16}) {
    const auto acc = dtype == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
    for (int64_t i : {128, 131}) {
      for (int64_t k : {2, 3}) {
        for (int deltas : {0, 1, 2, 3}) {  // bit 0: gate deltas, bit 1: up deltas
          for (bool keep_slots : {false, true}) {
            INFO("intermediate " << i << ", k " << k << ", deltas " << deltas << ", slots "
                                 << keep_slots);
            std::vector<torch::Tensor> in{
                cuda_randn({n, 2 * i}, dtype) * 3,
                torch::softmax(torch::randn({n, k}, torch::kFloat64), -1).to(torch::kCUDA, acc)};
            if (deltas & 1) in.push_back(cuda_randn({n, k, i}, dtype));
            if (deltas & 2) in.push_back(cuda_randn({n, k, i}, dtype));
            auto dy = cuda_randn({n * i * (keep_slots ? k + 1 : 1)}, dtype);
            auto run = [&](auto op) {
              return [op, deltas, keep_slots](const std::vector<torch::Tensor>& v) {
                const auto gate = deltas & 1 ? v[2] : torch::Tensor();
                const auto up = deltas & 2 ? v[deltas & 1 ? 3 : 2] : torch::Tensor();
                const MoeSwiglu out = op(v[0], gate, up, v[1], keep_slots);
                return keep_slots ? torch::cat({out.mixed.flatten(), out.slots.flatten()})
                                  : out.mixed.flatten();
              };
            };
            std::vector<torch::Tensor> in64;
            for (const auto& t : in) in64.push_back(f64(t));
            check(value_and_grads(run(moe_swiglu), in, dy),
                  value_and_grads(run(composite::moe_swiglu), in, dy),
                  value_and_grads(run(composite::moe_swiglu), in64, f64(dy)), dtype);
          }
        }
      }
    }
  }
}

TEST_CASE("fused q/k/v split with RoPE equals the composite with GQA on CUDA", "[gpu][kernels]") {
  REQUIRE(torch::cuda::is_available());
  torch::manual_seed(2);
  const int64_t b = 2, t = 19, h = 4, kv = 2, d = 16;
  // One table for all rows ([T, D]), and one per row ([B, T, D]: packed records' positions).
  for (auto [dtype, per_row] : {std::pair{torch::kFloat64, false},
                                {torch::kBFloat16, false},
                                {torch::kFloat64, true},
                                {torch::kBFloat16, true}}) {
    INFO("per-row tables: " << per_row);
    auto qkv = cuda_randn({b, t, (h + 2 * kv) * d}, dtype);
    auto angles = per_row ? torch::rand({b, t, d / 2}, torch::dtype(torch::kFloat64)) * 6
                          : torch::rand({t, d / 2}, torch::dtype(torch::kFloat64)) * 6;
    auto emb = torch::cat({angles, angles}, -1);
    auto cos = emb.cos().to(torch::kCUDA, dtype), sin = emb.sin().to(torch::kCUDA, dtype);
    auto dy = cuda_randn({b * t * (h + 2 * kv) * d}, dtype);
    auto run = [&](auto op, const torch::Tensor& c, const torch::Tensor& s) {
      return [op, c, s](const std::vector<torch::Tensor>& in) {
        const QKV out = op(in[0], h, kv, c, s);
        REQUIRE(out.q.sizes() == torch::IntArrayRef({b, h, t, d}));
        REQUIRE(out.v.sizes() == torch::IntArrayRef({b, kv, t, d}));
        return torch::cat({out.q.flatten(), out.k.flatten(), out.v.flatten()});
      };
    };
    check(value_and_grads(run(split_rope, cos, sin), {qkv}, dy),
          value_and_grads(run(composite::split_rope, cos, sin), {qkv}, dy),
          value_and_grads(run(composite::split_rope, f64(cos), f64(sin)), {f64(qkv)}, f64(dy)),
          dtype);
    // The kernel ran, not the composite it is checked against.
    const auto q = split_rope(qkv.clone().requires_grad_(true), h, kv, cos, sin).q;
    REQUIRE_THAT(q.grad_fn()->name(), Catch::Contains("SplitRopeFn"));
  }
}

TEST_CASE("fused loss-head log-softmax equals the composite with ignored rows on CUDA",
          "[gpu][kernels]") {
  REQUIRE(torch::cuda::is_available());
  torch::manual_seed(3);
  for (auto dtype : {torch::kFloat64, torch::kBFloat16}) {
    for (int64_t vocab : {1000, 1001}) {  // 16-byte rows and not
      INFO("vocab " << vocab);
      auto logits = cuda_randn({37, vocab}, dtype) * 4;
      auto targets = torch::randint(0, vocab, {37}, torch::dtype(torch::kInt64)).to(torch::kCUDA);
      targets.slice(0, 0, 37, 4).fill_(-100);
      auto [logp, d] = target_log_softmax(logits.clone(), targets, true);
      auto [ref_logp, ref_d] = composite::target_log_softmax(logits.clone(), targets, true);
      auto [true_logp, true_d] = composite::target_log_softmax(f64(logits).clone(), targets, true);
      check({logp, d}, {ref_logp, ref_d}, {true_logp, true_d}, dtype);
      REQUIRE(logp.slice(0, 0, 37, 4).abs().max().item<double>() == 0.0);
      REQUIRE(d.slice(0, 0, 37, 4).abs().max().item<double>() == 0.0);
      auto [only_logp, none] = target_log_softmax(logits.clone(), targets, false);
      REQUIRE(!none.defined());
      REQUIRE(torch::equal(only_logp, logp));
    }
  }
}
