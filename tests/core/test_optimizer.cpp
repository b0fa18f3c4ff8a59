#include <catch2/catch.hpp>
#include <optional>

#include "core/errors.h"
#include "core/optimizer.h"
#include "test_util.h"

using namespace lorafit;
using namespace lorafit::test;

namespace {

std::vector<torch::Tensor> fresh_params() {
  torch::manual_seed(3);
  return {torch::randn({16, 8}).requires_grad_(true), torch::randn({5}).requires_grad_(true),
          torch::randn({3, 2, 4}).requires_grad_(true)};
}

// A loss whose gradients differ per tensor and per step, large enough to be clipped.
void backward(const std::vector<torch::Tensor>& params, int step) {
  torch::Tensor loss = torch::zeros({});
  for (size_t i = 0; i < params.size(); ++i)
    loss = loss + (params[i].pow(2) * (3.0 + step + static_cast<double>(i))).sum() +
           params[i].sum() * step;
  loss.backward();
}

}  // namespace

TEST_CASE("AdamW with clipping and weight decay steps as LibTorch's AdamW and clip_grad_norm_",
          "[core][optimizer]") {
  auto ours = fresh_params(), theirs = fresh_params();
  AdamWSettings s;
  s.weight_decay = 0.1;
  AdamW adamw(ours, s);
  torch::optim::AdamW reference(theirs, torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
  for (int step = 0; step < 4; ++step) {
    backward(ours, step);
    backward(theirs, step);
    const auto norm = adamw.step(1e-2, 1.0);
    const double ref_norm = torch::nn::utils::clip_grad_norm_(theirs, 1.0);
    reference.step();
    reference.zero_grad();
    REQUIRE(norm.item<double>() == Approx(ref_norm).epsilon(1e-6));
    REQUIRE(ref_norm > 1.0);  // clipping took effect
    for (size_t i = 0; i < ours.size(); ++i) {
      REQUIRE(!ours[i].grad().defined());
      REQUIRE(torch::allclose(ours[i], theirs[i], 1e-6, 1e-7));
    }
  }
}

TEST_CASE("AdamW state saved and loaded continues as if never interrupted", "[core][optimizer]") {
  TempDir dir;
  const auto path = (dir.path / "optimizer.safetensors").string();
  auto straight = fresh_params(), resumed = fresh_params();
  AdamW a(straight, {}), b(resumed, {});
  for (int step = 0; step < 2; ++step) {
    backward(straight, step);
    a.step(1e-2, 0.0);
    backward(resumed, step);
    b.step(1e-2, 0.0);
  }
  b.save(path);
  AdamW c(resumed, {});
  c.load(path);
  REQUIRE(c.steps == 2);
  backward(straight, 2);
  a.step(1e-2, 0.0);
  backward(resumed, 2);
  c.step(1e-2, 0.0);
  for (size_t i = 0; i < straight.size(); ++i) REQUIRE(torch::equal(straight[i], resumed[i]));

  // State for other tensors is refused with the count in the message.
  AdamW other(std::vector<torch::Tensor>{torch::zeros({2}, torch::requires_grad())}, {});
  REQUIRE_THROWS_WITH(other.load(path), Catch::Contains("is for 3 tensors, this run trains 1"));
}

TEST_CASE("fp32 master weights keep updates that a bf16 weight would round away",
          "[core][optimizer]") {
  // lr 1e-4 moves a weight of 1 by 1e-4 a step (Adam's normalised step), far below bf16's
  // spacing of 2^-7 there: stepped directly, the bf16 weight never moves.
  auto run = [](bool masters_on) {
    auto w = torch::ones({4}, torch::kBFloat16).requires_grad_(true);
    std::vector<torch::Tensor> params{w};
    std::optional<MasterWeights> masters;
    if (masters_on) {
      masters.emplace(params);
      params = masters->masters;
    }
    AdamW opt(params, AdamWSettings{});
    for (int i = 0; i < 100; ++i) {
      (w.to(torch::kFloat32) * 2.0).sum().backward();
      if (masters) masters->take_grads();
      REQUIRE(!w.grad().defined() == masters_on);
      opt.step(1e-4, 0.0);
      if (masters) masters->publish();
    }
    return w.detach().to(torch::kFloat32);
  };
  REQUIRE(torch::equal(run(false), torch::ones({4})));
  const auto moved = run(true);  // 1 - 100 * 1e-4 = 0.99, rounded to bf16
  REQUIRE(moved[0].item<double>() == Approx(0.99).margin(4e-3));
}
