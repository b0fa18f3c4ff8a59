// train.cuda_graphs on CUDA: a run whose forward-backward passes replay from CUDA graphs gives
// the losses and adapters of the same run executed eagerly. Fused jobs of three adapter types,
// with two micro-batches a step and a layout that changes when one job ends (an eager pass of
// the new layout adds to gradients the graph of the old one made), with and without
// checkpointed layers that keep cuDNN's or flash's attention state.
#include <catch2/catch.hpp>
#include <regex>

#include "test_util.h"

using namespace lorafit;
using lorafit::test::adapter_diff;
using lorafit::test::metric;
using lorafit::test::run_lorafit;
constexpr auto q = lorafit::test::quote;
using lorafit::test::TempDir;

namespace {

const std::vector<std::string> kJobs = {"lora", "dora", "multi"};

std::string recipe(const std::string& out, bool graphs, const std::string& dtype, bool ckpt) {
  return R"(model: tests/fixtures/gqa_llama3/model
output: )" +
         out +
         R"(
seed: 0
device: cuda
dtype: )" +
         dtype +
         R"(
data: {train: recipes/data/tiny_train.jsonl, max_seq_len: 64, packing: concat}
adapter: {type: lora, r: 8, alpha: 16, dropout: 0.0, targets: all-linear}
train: {steps: 12, batch_size: 8, micro_batch_size: 4, lr: 5.0e-3, warmup_steps: 2,
        log_every: 1, eval_every: 0, save_every: 0, gradient_checkpointing: )" +
         (ckpt ? "true, checkpoint_keep: [attention, residual]" : "false") +
         ", cuda_graphs: " + (graphs ? "true" : "false") + R"(}
jobs:
  - name: lora
  - name: dora
    seed: 3
    adapter: {type: dora, targets: [q_proj, v_proj, down_proj]}
    train: {steps: 7, batch_size: 4, micro_batch_size: 2}
  - name: multi
    seed: 5
    adapter: {type: multilora, n: 2, r: 2, alpha: 4}
    train: {schedule: linear}
)";
}

void train(const TempDir& tmp, const std::string& name, const std::string& text) {
  lorafit::test::write_text(tmp / (name + ".yaml"), text);
  const auto r = run_lorafit("train " + q(tmp / (name + ".yaml")));
  INFO(r.err);
  REQUIRE(r.code == 0);
  if (text.find("cuda_graphs: true") == std::string::npos) return;
  // Each layout runs once eagerly, is captured at its second pass and replayed from then on:
  // two layouts (three jobs, then two when the DoRA job ends), 24 passes.
  std::smatch m;
  REQUIRE(std::regex_search(
      r.err, m,
      std::regex("cuda_graphs replayed ([0-9]+) of ([0-9]+) forward-backward passes "
                 "\\(([0-9]+) graphs\\)")));
  const auto replayed = std::stoi(m[1]), passes = std::stoi(m[2]), graphs = std::stoi(m[3]);
  REQUIRE(graphs == 2);
  REQUIRE(passes == 24);
  REQUIRE(replayed == passes - graphs);
}

}  // namespace

TEST_CASE("CUDA graphs replay the eager run's losses and adapters", "[gpu][graphs]") {
  struct Case {
    std::string dtype;
    bool ckpt;
    double loss_tol, adapter_tol;
  };
  // f32: the same kernels in the same order, so round-off only where a kernel's own order
  // varies; bf16 with kept attention: cuDNN's and flash's backward add in varying order.
  for (const auto& c : {Case{"f32", false, 1e-6, 1e-5}, Case{"bf16", true, 2e-3, 2e-3}}) {
    INFO(c.dtype << ", checkpointing " << c.ckpt);
    TempDir tmp;
    const auto eager = tmp / "eager", graphed = tmp / "graphed";
    train(tmp, "eager", recipe(eager, false, c.dtype, c.ckpt));
    train(tmp, "graphed", recipe(graphed, true, c.dtype, c.ckpt));
    for (const auto& job : kJobs) {
      INFO("job " << job);
      const auto a = metric(eager + "/" + job, "loss"), b = metric(graphed + "/" + job, "loss");
      REQUIRE(a.size() == (job == "dora" ? 7u : 12u));
      REQUIRE(b.size() == a.size());
      double worst = 0;
      for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(a[i] - b[i]) / a[i]);
      WARN("largest relative loss difference " << worst);
      REQUIRE(worst < c.loss_tol);
      // The run learned: a replay that read stale inputs or lost gradients would not match.
      REQUIRE(a.back() < a.front());
      const double diff =
          adapter_diff(eager + "/" + job + "/adapter", graphed + "/" + job + "/adapter");
      WARN("largest adapter difference " << diff);
      REQUIRE(diff < c.adapter_tol);
    }
  }
}
