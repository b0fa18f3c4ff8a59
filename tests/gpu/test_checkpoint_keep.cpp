// Checkpointed layers that keep the fused attention's state (train.checkpoint_keep) on CUDA:
// the recomputation returns the kept output without running the forward again, and the
// gradients are those of attention run anew, per row (cuDNN where SDPA runs it) and per packed
// record (flash), and through a whole model.
#include <catch2/catch.hpp>

#include "adapters/lora.h"
#include "adapters/peft_names.h"
#include "adapters/registry.h"
#include "core/adapter_io.h"
#include "core/attention.h"
#include "core/compat.h"
#include "core/llama.h"
#include "test_util.h"

using namespace lorafit;
using lorafit::test::rel_err_f64;

TEST_CASE("kept attention replays its output and gives attention's gradients on CUDA",
          "[gpu][checkpoint]") {
  REQUIRE(torch::cuda::is_available());
  torch::manual_seed(3);
  // The 7B rows' head size, grouped KV heads: on Hopper SDPA runs cuDNN's kernel for whole
  // rows, which the kept attention then runs too.
  const int64_t b = 2, t = 128, heads = 8, kv = 2, d = 128;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const auto bf16 = torch::dtype(torch::kBFloat16).device(torch::kCUDA);
  // The projections' layout, [B, T, heads, D], seen as [B, heads, T, D].
  auto heads_of = [&](int64_t n) { return torch::randn({b, t, n, d}, bf16).transpose(1, 2); };
  const auto q = heads_of(heads), k = heads_of(kv), v = heads_of(kv);
  const auto dy = torch::randn({b, heads, t, d}, bf16);
  // Row 0: records of 90 and 38 tokens; row 1: one of 128.
  const auto cu = torch::tensor({0, 90, 128, 256}, torch::kInt32).to(torch::kCUDA);
  const auto segment_ids =
      torch::cat({torch::zeros({90}), torch::ones({38}), torch::full({128}, 2.0)})
          .to(torch::kInt64)
          .view({b, t})
          .to(torch::kCUDA);
  for (const bool packed : {false, true}) {
    INFO("packed records: " << packed);
    compat::AttentionState kept;
    torch::Tensor first;  // [B, H, T, D]
    {
      torch::NoGradGuard no_grad;
      first = kept_attention(q, k, v, scale, packed ? cu : torch::Tensor(), 128, kept);
    }
    REQUIRE(kept.defined());
    // cuDNN's state for whole rows where SDPA runs cuDNN, flash's otherwise.
    const bool cudnn = !packed && compat::sdpa_runs_cudnn(q, k, v, scale);
    INFO("cuDNN: " << cudnn);
    REQUIRE(kept.out.dim() == (cudnn ? 4 : 3));
    auto grads = [&](bool replay) {
      auto ql = q.detach().requires_grad_(true), kl = k.detach().requires_grad_(true),
           vl = v.detach().requires_grad_(true);
      torch::Tensor y;
      if (replay) {
        y = kept_attention(ql, kl, vl, scale, packed ? cu : torch::Tensor(), 128, kept);
        // The kept output itself: no forward ran again.
        REQUIRE(y.data_ptr() == first.data_ptr());
      } else {
        y = packed ? record_attention(ql, kl, vl, scale, segment_ids, cu, 128)
                   : causal_attention(ql, kl, vl, scale);
      }
      y.backward(dy);
      return std::vector<torch::Tensor>{y.detach(), ql.grad(), kl.grad(), vl.grad()};
    };
    const auto replayed = grads(true), anew = grads(false);
    for (size_t i = 0; i < anew.size(); ++i) {
      INFO("output " << i << " (0: value, then the gradients of q, k, v)");
      REQUIRE(rel_err_f64(replayed[i], anew[i]) < 1e-2);
    }
  }
}

TEST_CASE(
    "checkpointed layers that keep attention, the residual and gate/up's output give the plain "
    "gradients on CUDA",
    "[gpu][checkpoint]") {
  REQUIRE(torch::cuda::is_available());
  auto grads = [](bool checkpoint, CheckpointKeep keep) {
    auto model = random_llama(builtin_shape("tiny"), torch::kCUDA, torch::kBFloat16, 4);
    torch::manual_seed(9);
    find_adapter("lora").attach_new({4, 8.0, 0.0, false, kProjectionKinds}, model->adapter_sites());
    for (auto p : model->projections()) {
      torch::NoGradGuard g;
      if (p->adapter) p->adapter->as<LoraImpl>()->lora_B.normal_(0.0, 0.1);
    }
    const auto params = trainable_parameters(model);
    model->train();
    model->checkpoint_layers = checkpoint;
    model->checkpoint_keep = keep;
    torch::manual_seed(2);
    const auto ids = torch::randint(3, 320, {2, 64}, torch::kInt64).to(torch::kCUDA);
    model->logits(model->forward(ids)).to(torch::kFloat32).pow(2).mean().backward();
    std::vector<torch::Tensor> out;
    for (const auto& p : params) out.push_back(p.grad().clone());
    return out;
  };
  const auto plain = grads(false, {}), recomputed = grads(true, {});
  for (const auto keep : {CheckpointKeep{true, true}, CheckpointKeep{true, true, true}}) {
    const auto kept = grads(true, keep);
    REQUIRE(kept.size() == plain.size());
    for (size_t i = 0; i < plain.size(); ++i) {
      INFO("keeping gate/up " << keep.gate_up << ", parameter " << i);
      // As close to the plain backward as a full recomputation is, give or take bf16 noise.
      REQUIRE(rel_err_f64(kept[i], plain[i]) < 2 * rel_err_f64(recomputed[i], plain[i]) + 2e-2);
    }
  }
}
