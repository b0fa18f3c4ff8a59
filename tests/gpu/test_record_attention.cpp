// Packed records on CUDA: flash attention's variable-length kernels (no mask) against each
// record's own causal attention in float64, values and input gradients.
#include <catch2/catch.hpp>

#include "core/attention.h"
#include "core/compat.h"

using namespace lorafit;

TEST_CASE("packed records through varlen flash attention equal each record alone on CUDA",
          "[gpu][packing]") {
  REQUIRE(torch::cuda::is_available());
  torch::manual_seed(5);
  const int64_t b = 2, t = 40, heads = 8, kv = 2, d = 64;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  // Row 0: records of 7, 20 and 13 tokens; row 1: 25 and 9, then 6 of padding (a record).
  const std::vector<int64_t> lengths{7, 20, 13, 25, 9, 6};
  auto ids = torch::empty({b * t}, torch::kInt64);
  std::vector<int32_t> cu{0};
  for (size_t s = 0; s < lengths.size(); ++s) {
    ids.narrow(0, cu.back(), lengths[s]).fill_(static_cast<int64_t>(s));
    cu.push_back(cu.back() + static_cast<int32_t>(lengths[s]));
  }
  const auto cuda = torch::TensorOptions().device(torch::kCUDA);
  const auto segment_ids = ids.view({b, t}).to(torch::kCUDA);
  const auto cu_seqlens =
      torch::from_blob(cu.data(), {static_cast<int64_t>(cu.size())}, torch::kInt32)
          .to(torch::kCUDA);
  // The projections' layout, [B, T, heads, D], seen as [B, heads, T, D].
  auto heads_of = [&](int64_t n) {
    return torch::randn({b, t, n, d}, cuda.dtype(torch::kFloat64)).transpose(1, 2);
  };
  const auto q64 = heads_of(heads), k64 = heads_of(kv), v64 = heads_of(kv);
  const auto upstream = torch::randn({b, heads, t, d}, cuda.dtype(torch::kFloat64));

  auto grads = [&](const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                   bool packed) {
    auto ql = q.detach().requires_grad_(true), kl = k.detach().requires_grad_(true),
         vl = v.detach().requires_grad_(true);
    torch::Tensor y;  // [B, heads, T, D]
    if (packed) {
      y = record_attention(ql, kl, vl, scale, segment_ids, cu_seqlens, 25);
    } else {
      std::vector<torch::Tensor> rows;
      int64_t s = 0;
      for (int64_t r = 0; r < b; ++r) {
        std::vector<torch::Tensor> records;
        for (int64_t at = 0; at < t; at += lengths[s++]) {
          auto part = [&](const torch::Tensor& x) {
            return x.narrow(0, r, 1).narrow(2, at, lengths[s]);
          };
          records.push_back(causal_attention(part(ql), part(kl), part(vl), scale));
        }
        rows.push_back(torch::cat(records, 2));
      }
      y = torch::cat(rows, 0);
    }
    y.backward(upstream.to(y.scalar_type()));
    return std::vector<torch::Tensor>{y.detach(), ql.grad(), kl.grad(), vl.grad()};
  };
  REQUIRE(compat::has_varlen_flash(q64.to(torch::kBFloat16)));
  const auto truth = grads(q64, k64, v64, false);
  const auto flash =
      grads(q64.to(torch::kBFloat16), k64.to(torch::kBFloat16), v64.to(torch::kBFloat16), true);
  const auto plain =
      grads(q64.to(torch::kBFloat16), k64.to(torch::kBFloat16), v64.to(torch::kBFloat16), false);
  for (size_t i = 0; i < truth.size(); ++i) {
    INFO("output " << i << " (0: value, then the gradients of q, k, v)");
    auto err = [&](const torch::Tensor& x) {
      return (x.to(torch::kFloat64) - truth[i]).abs().max().item<double>() /
             truth[i].abs().max().item<double>();
    };
    // As close to the truth as bf16 attention one record at a time is, give or take.
    REQUIRE(err(flash[i]) < 2 * err(plain[i]) + 4e-3);
  }
}
