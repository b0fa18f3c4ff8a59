// train.cuda_graphs on CUDA: a run whose forward-backward passes replay from CUDA graphs gives
// the losses and adapters of the same run executed eagerly. Fused jobs of three adapter types,
// with two micro-batches a step and a layout that changes when one job ends, with and without
// checkpointed layers that keep cuDNN's or flash's attention state; and padded rows of many
// lengths, where a step's passes mix replays with eager passes of unseen layouts, which add to
// the same gradients.
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

struct Counts {
  int replayed = 0, passes = 0, graphs = 0;
};

// Trains the recipe `text`; with cuda_graphs, what the run says it replayed.
Counts train(const TempDir& tmp, const std::string& name, const std::string& text) {
  lorafit::test::write_text(tmp / (name + ".yaml"), text);
  const auto r = run_lorafit("train " + q(tmp / (name + ".yaml")));
  INFO(r.err);
  REQUIRE(r.code == 0);
  if (text.find("cuda_graphs: true") == std::string::npos) return {};
  std::smatch m;
  REQUIRE(std::regex_search(
      r.err, m,
      std::regex("cuda_graphs replayed ([0-9]+) of ([0-9]+) forward-backward passes "
                 "\\(([0-9]+) graphs\\)")));
  return {std::stoi(m[1]), std::stoi(m[2]), std::stoi(m[3])};
}

// The runs' step losses and adapters, job by job, within the tolerances.
void require_same_runs(const std::string& eager,
                       const std::string& graphed,
                       const std::vector<std::pair<std::string, size_t>>& jobs,
                       double loss_tol,
                       double adapter_tol) {
  for (const auto& [job, steps] : jobs) {
    INFO("job " << job);
    const auto a = metric(eager + job, "loss"), b = metric(graphed + job, "loss");
    REQUIRE(a.size() == steps);
    REQUIRE(b.size() == a.size());
    double worst = 0;
    for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(a[i] - b[i]) / a[i]);
    WARN("largest relative loss difference " << worst);
    REQUIRE(worst < loss_tol);
    // The run learned: a replay that read stale inputs or lost gradients would not match.
    REQUIRE(a.back() < a.front());
    const double diff = adapter_diff(eager + job + "/adapter", graphed + job + "/adapter");
    WARN("largest adapter difference " << diff);
    REQUIRE(diff < adapter_tol);
  }
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
    const auto n = train(tmp, "graphed", recipe(graphed, true, c.dtype, c.ckpt));
    // Each layout runs once eagerly, is captured at its second pass and replayed from then on:
    // two layouts (three jobs, then two when the DoRA job ends), 24 passes.
    REQUIRE(n.graphs == 2);
    REQUIRE(n.passes == 24);
    REQUIRE(n.replayed == n.passes - n.graphs);
    require_same_runs(eager + "/", graphed + "/", {{"lora", 12}, {"dora", 7}, {"multi", 12}},
                      c.loss_tol, c.adapter_tol);
  }
}

TEST_CASE("CUDA graphs mix with eager passes of unseen layouts in a step", "[gpu][graphs]") {
  // Records padded one a row, each micro-batch to its longest: some lengths come back (and
  // replay), others are new (and run eagerly) in the same step.
  auto text = [](const std::string& out, bool graphs) {
    return R"(model: tests/fixtures/gqa_llama3/model
output: )" +
           out +
           R"(
seed: 1
device: cuda
dtype: f32
data: {train: recipes/data/tiny_train.jsonl, max_seq_len: 64, packing: false}
adapter: {type: lora, r: 8, alpha: 16, dropout: 0.0, targets: all-linear}
train: {steps: 30, batch_size: 4, micro_batch_size: 2, lr: 5.0e-3, warmup_steps: 2,
        log_every: 1, eval_every: 0, save_every: 0, cuda_graphs: )" +
           (graphs ? "true" : "false") + "}\n";
  };
  TempDir tmp;
  const auto eager = tmp / "eager", graphed = tmp / "graphed";
  train(tmp, "eager", text(eager, false));
  const auto n = train(tmp, "graphed", text(graphed, true));
  INFO(n.replayed << " of " << n.passes << " passes replayed from " << n.graphs << " graphs");
  REQUIRE(n.passes == 60);
  REQUIRE(n.replayed > 10);
  REQUIRE(n.replayed < n.passes - n.graphs);  // some passes ran eagerly beyond the warm-ups
  require_same_runs(eager, graphed, {{"", 30}}, 1e-6, 1e-5);
}
