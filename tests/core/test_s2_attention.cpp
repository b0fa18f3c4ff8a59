#include <catch2/catch.hpp>

#include "adapters/registry.h"
#include "core/compat.h"
#include "core/errors.h"
#include "core/llama.h"
#include "test_util.h"

using namespace lorafit;

namespace {

// Which key j query i may see in head h, straight from the definitions: the group of a
// position, counted in the head's own (maybe rolled or offset) order.
bool allowed(int64_t i, int64_t j, int64_t h, int64_t heads, int64_t l, int64_t g, S2Shift shift) {
  if (h < heads / 2 || shift == S2Shift::None) return i / g == j / g && j <= i;
  if (shift == S2Shift::Roll) {
    const auto ri = (i - g / 2 + l) % l, rj = (j - g / 2 + l) % l;
    return ri / g == rj / g && rj <= ri;
  }
  return (i + g / 2) / g == (j + g / 2) / g && j <= i;  // segments offset by g/2
}

// Per-head masked attention over every query and key, float64.
torch::Tensor brute_force(const torch::Tensor& q,
                          const torch::Tensor& k,
                          const torch::Tensor& v,
                          int64_t g,
                          S2Shift shift,
                          const torch::Tensor& keep,
                          const torch::Tensor& segments = {}) {
  const auto b = q.size(0), heads = q.size(1), l = q.size(2);
  const auto kk = repeat_kv(k, heads), vv = repeat_kv(v, heads);
  auto out = torch::zeros_like(q);
  for (int64_t r = 0; r < b; ++r) {
    for (int64_t h = 0; h < heads; ++h) {
      auto mask = torch::zeros({l, l}, torch::kBool);
      for (int64_t i = 0; i < l; ++i) {
        for (int64_t j = 0; j < l; ++j) {
          bool ok = allowed(i, j, h, heads, l, g, shift);
          // Padded keys stay hidden from real queries wherever a group wraps around.
          if (keep.defined() && keep[r][i].item<bool>() && !keep[r][j].item<bool>()) ok = false;
          // Packed records never see each other.
          if (segments.defined() &&
              segments[r][i].item<int64_t>() != segments[r][j].item<int64_t>())
            ok = false;
          mask[i][j] = ok;
        }
      }
      auto scores = q[r][h].matmul(kk[r][h].t()) / std::sqrt(static_cast<double>(q.size(3)));
      scores = scores.masked_fill(mask.logical_not(), -INFINITY);
      out[r][h] = torch::softmax(scores, -1).matmul(vv[r][h]);
    }
  }
  return out;
}

}  // namespace

TEST_CASE("S2-Attn with one group and no shift is full causal attention", "[core][s2]") {
  auto q = torch::randn({2, 4, 12, 8}, torch::kFloat64);
  auto k = torch::randn({2, 2, 12, 8}, torch::kFloat64),
       v = torch::randn({2, 2, 12, 8}, torch::kFloat64);
  const double scale = 1.0 / std::sqrt(8.0);
  REQUIRE(torch::allclose(s2_attention(q, k, v, scale, 12, S2Shift::None),
                          causal_attention(q, k, v, scale), 1e-12, 1e-12));
}

TEST_CASE("S2-Attn equals a brute-force per-head masked attention", "[core][s2]") {
  const int64_t b = 2, l = 16, d = 4, g = 4;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  // Right padding in row 1: its last 3 tokens.
  auto keep = torch::ones({b, l}, torch::kBool);
  keep[1].narrow(0, l - 3, 3).fill_(false);
  for (auto shift : {S2Shift::Roll, S2Shift::NoWrap, S2Shift::None}) {
    for (int64_t kv : {8, 4, 1}) {  // MHA, GQA, MQA (one KV head: repeated, not split)
      for (bool padded : {false, true}) {
        INFO("shift " << static_cast<int>(shift) << ", kv heads " << kv << ", padded " << padded);
        auto q = torch::randn({b, 8, l, d}, torch::kFloat64).requires_grad_(true);
        auto k = torch::randn({b, kv, l, d}, torch::kFloat64).requires_grad_(true);
        auto v = torch::randn({b, kv, l, d}, torch::kFloat64).requires_grad_(true);
        const auto mask = padded ? keep : torch::Tensor();
        const auto ours = s2_attention(q, k, v, scale, g, shift, mask);
        const auto ref = brute_force(q, k, v, g, shift, mask);
        // Padded queries' outputs are never used: compare the real ones, values and gradients.
        const auto real = (padded ? keep : torch::ones({b, l}, torch::kBool))
                              .view({b, 1, l, 1})
                              .to(torch::kFloat64);
        REQUIRE(torch::allclose(ours * real, ref * real, 1e-10, 1e-12));
        const auto upstream = torch::randn_like(ours) * real;
        const auto g1 = torch::autograd::grad({ours}, {q, k, v}, {upstream});
        const auto g2 = torch::autograd::grad({ref}, {q, k, v}, {upstream});
        for (size_t i = 0; i < 3; ++i) REQUIRE(torch::allclose(g1[i], g2[i], 1e-10, 1e-12));
      }
    }
  }
}

TEST_CASE("S2-Attn over packed records keeps each group's records apart", "[core][s2]") {
  const int64_t b = 2, l = 16, d = 4, g = 4;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  // Row 0: records of 5, 7 and 4 tokens; row 1: 9 and 4 tokens, then 3 of padding (a record).
  auto segments = torch::empty({b, l}, torch::kInt64);
  int64_t at = 0, id = 0;
  for (auto [row, n] :
       std::vector<std::pair<int64_t, int64_t>>{{0, 5}, {0, 7}, {0, 4}, {1, 9}, {1, 4}, {1, 3}}) {
    if (row == 1 && at >= l) at = 0;
    segments[row].narrow(0, at, n).fill_(id++);
    at += n;
  }
  for (auto shift : {S2Shift::Roll, S2Shift::NoWrap, S2Shift::None}) {
    INFO("shift " << static_cast<int>(shift));
    auto q = torch::randn({b, 8, l, d}, torch::kFloat64).requires_grad_(true);
    auto k = torch::randn({b, 4, l, d}, torch::kFloat64).requires_grad_(true);
    auto v = torch::randn({b, 4, l, d}, torch::kFloat64).requires_grad_(true);
    const auto ours = s2_attention(q, k, v, scale, g, shift, {}, segments);
    const auto ref = brute_force(q, k, v, g, shift, {}, segments);
    REQUIRE(torch::allclose(ours, ref, 1e-10, 1e-12));
    const auto upstream = torch::randn_like(ours);
    const auto g1 = torch::autograd::grad({ours}, {q, k, v}, {upstream});
    const auto g2 = torch::autograd::grad({ref}, {q, k, v}, {upstream});
    for (size_t i = 0; i < 3; ++i) REQUIRE(torch::allclose(g1[i], g2[i], 1e-10, 1e-12));
  }
}

TEST_CASE("S2-Attn refuses lengths that do not split into groups", "[core][s2]") {
  auto q = torch::randn({1, 4, 10, 8}), k = torch::randn({1, 2, 10, 8});
  REQUIRE_THROWS_WITH(s2_attention(q, k, k, 1.0, 4, S2Shift::Roll),
                      Catch::Contains("10 tokens") && Catch::Contains("groups of 4"));
  REQUIRE_THROWS_AS(s2_attention(q, k, k, 1.0, 5, S2Shift::NoWrap), ConfigError);  // odd group
  REQUIRE_NOTHROW(s2_attention(q, k, k, 1.0, 5, S2Shift::None));
}

TEST_CASE("the model runs S2-Attn in training only, checkpointed or not", "[core][s2]") {
  auto model = load_llama(lorafit::test::fixture("gqa_llama3/model"), torch::kCPU, torch::kFloat64);
  model->to(torch::kFloat64);
  const auto ids = torch::randint(3, 320, {2, 16}, torch::kInt64);
  auto run = [&](bool training, bool checkpoint) {
    model->train(training);
    model->checkpoint_layers = checkpoint;
    return model->logits(model->forward(ids)).detach();
  };
  model->eval();
  const auto full = run(false, false);
  // One group without shift is full causal attention.
  model->use_s2(1.0, S2Shift::None);
  REQUIRE(torch::allclose(run(true, false), full, 1e-10, 1e-12));
  // Shifted groups of 4 change the training forward, not evaluation, and checkpointed layers
  // recompute the same thing.
  model->use_s2(0.25, S2Shift::Roll);
  const auto s2 = run(true, false);
  REQUIRE(!torch::allclose(s2, full, 1e-3, 1e-3));
  REQUIRE(torch::allclose(run(false, false), full, 1e-10, 1e-12));
  REQUIRE(torch::allclose(run(true, true), s2, 1e-10, 1e-12));
}

TEST_CASE("checkpointed layers give S2-Attn's gradients on a padded batch", "[core][s2]") {
  auto grads = [](bool checkpoint) {
    torch::manual_seed(4);
    auto model =
        load_llama(lorafit::test::fixture("gqa_llama3/model"), torch::kCPU, torch::kFloat64);
    find_adapter("lora").attach_new({4, 8.0, 0.0, false, {"q_proj", "v_proj", "o_proj"}},
                                    model->adapter_sites());
    model->to(torch::kFloat64);
    for (auto& p : model->parameters()) p.set_requires_grad(false);
    std::vector<torch::Tensor> params;
    for (auto& item : model->named_parameters())
      if (item.key().find(".adapter.") != std::string::npos) {
        torch::NoGradGuard g;
        item.value().normal_(0.0, 0.1);
        params.push_back(item.value().set_requires_grad(true));
      }
    model->use_s2(0.25, S2Shift::Roll);
    model->train();
    model->checkpoint_layers = checkpoint;
    const auto ids = torch::randint(3, 320, {2, 16}, torch::kInt64);
    auto keep = torch::ones({2, 16}, torch::kBool);
    keep[1].narrow(0, 12, 4).fill_(false);
    const auto real = keep.to(torch::kFloat64).unsqueeze(-1);
    (model->logits(model->forward(ids, nullptr, keep)) * real).pow(2).mean().backward();
    std::vector<torch::Tensor> out;
    for (const auto& p : params) out.push_back(p.grad().clone());
    return out;
  };
  const auto plain = grads(false), checkpointed = grads(true);
  lorafit::test::require_same_gradients(plain, checkpointed);
}
