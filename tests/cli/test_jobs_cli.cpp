// `lorafit train` with `jobs:`: several adapters trained at once on the tiny fixture model.
#include <catch2/catch.hpp>

#include "core/safetensors.h"
#include "test_util.h"

using namespace lorafit;
namespace fs = std::filesystem;
using lorafit::test::read_text;
using lorafit::test::run_lorafit;
constexpr auto q = lorafit::test::quote;
using lorafit::test::adapter_diff;
using lorafit::test::TempDir;

namespace {

// Four jobs unlike each other: adapter types, ranks, targets, learning rates, seeds, lengths
// (24-token rows go in a forward pass of their own, qv's 40-token rows are padded to 64),
// batch and micro-batch sizes (so each steps its optimizer on its own cadence), step counts.
std::string jobs_recipe(const std::string& out, const std::string& extra = "") {
  return R"(model: tests/fixtures/gqa_llama3/model
output: )" +
         out + R"(
seed: 0
device: cpu
data: {train: recipes/data/tiny_train.jsonl, valid: recipes/data/tiny_valid.jsonl, max_seq_len: 64}
adapter: {type: lora, r: 8, alpha: 16, dropout: 0.0, targets: all-linear}
train: {steps: 12, batch_size: 8, micro_batch_size: 4, lr: 5.0e-3, warmup_steps: 2,
        log_every: 4, eval_every: 6, save_every: 6}
)" + extra +
         R"(
jobs:
  - name: qv
    adapter: {r: 4, targets: [q_proj, v_proj]}
    data: {max_seq_len: 40}
    train: {lr: 1.0e-2}
  - name: short
    seed: 3
    data: {max_seq_len: 24}
    train: {steps: 9, batch_size: 4, micro_batch_size: 2}
  - name: multi
    adapter: {type: multilora, n: 2, r: 2, alpha: 4}
    train: {steps: 10, batch_size: 6, micro_batch_size: 2, schedule: linear}
  - name: mix
    adapter: {type: mixlora, r: 4, num_experts: 4, top_k: 2, router_aux_loss_coef: 0.01,
              targets: [q_proj, gate_proj, up_proj, down_proj]}
    train: {batch_size: 4, micro_batch_size: 4, steps: 10}
)";
}

const std::vector<std::string> kJobs = {"qv", "short", "multi", "mix"};

lorafit::test::RunResult train_recipe(const std::string& path, const std::string& args = "") {
  return run_lorafit("train " + q(path) + " " + args);
}

std::string write_recipe(const TempDir& tmp, const std::string& name, const std::string& text) {
  lorafit::test::write_text(tmp / name, text);
  return tmp / name;
}

}  // namespace

TEST_CASE("a fused run of four jobs ends with the adapters of four runs alone", "[cli][jobs]") {
  // Gradient checkpointing and padding are pinned in float64 by the routing tests: here fp32
  // round-off in rarely chosen MixLoRA experts' near-zero gradients, which AdamW scales up to
  // whole steps, would exceed 1e-5 (about 1.4e-5 in one expert's A with checkpointing).
  TempDir tmp;
  const auto out = tmp / "fused";
  const auto r = train_recipe(write_recipe(tmp, "jobs.yaml", jobs_recipe(out)));
  INFO(r.err);
  REQUIRE(r.code == 0);
  REQUIRE(fs::exists(out + "/recipe.yaml"));
  for (const auto& name : kJobs) {
    INFO(name);
    const auto job = out + "/" + name;
    for (const char* f : {"adapter/adapter_model.safetensors", "metrics.jsonl", "loss.svg",
                          "recipe.yaml", "checkpoints/step-6", "job_state.json"})
      REQUIRE(fs::exists(job + "/" + f));
    REQUIRE_THAT(r.err, Catch::Contains("[" + name + "] adapter written to"));
    // The job alone, from the recipe the fused run resolved for it.
    const auto alone = tmp / ("alone-" + name);
    const auto single = train_recipe(job + "/recipe.yaml", "--set output=" + q(alone));
    INFO(single.err);
    REQUIRE(single.code == 0);
    REQUIRE(adapter_diff(job + "/adapter", alone + "/adapter") < 1e-5);
    REQUIRE(read_text(job + "/adapter/adapter_config.json") ==
            read_text(alone + "/adapter/adapter_config.json"));
  }
}

TEST_CASE("a DoRA job beside a LoRA job trains as alone and resumes", "[cli][jobs]") {
  TempDir tmp;
  const auto out = tmp / "fused";
  const std::string jobs = R"(model: tests/fixtures/gqa_llama3/model
output: )" + out + R"(
device: cpu
data: {train: recipes/data/tiny_train.jsonl, max_seq_len: 64}
adapter: {r: 4, alpha: 8, dropout: 0.0}
train: {steps: 12, batch_size: 4, micro_batch_size: 2, lr: 5.0e-3, warmup_steps: 2,
        log_every: 4, eval_every: 0, save_every: 6}
jobs:
  - name: dora
    adapter: {type: dora, targets: [q_proj, v_proj, o_proj, up_proj, down_proj]}
  - name: lora
    seed: 2
    adapter: {targets: [q_proj, k_proj, gate_proj]}
    data: {max_seq_len: 40}
)";
  const auto recipe = write_recipe(tmp, "jobs.yaml", jobs);
  const auto r = train_recipe(recipe);
  INFO(r.err);
  REQUIRE(r.code == 0);
  for (const char* name : {"dora", "lora"}) {
    INFO(name);
    const auto job = out + "/" + name;
    const auto alone = tmp / (std::string("alone-") + name);
    const auto single = train_recipe(job + "/recipe.yaml", "--set output=" + q(alone));
    INFO(single.err);
    REQUIRE(single.code == 0);
    REQUIRE(adapter_diff(job + "/adapter", alone + "/adapter") < 1e-5);
  }
  REQUIRE(lorafit::test::read_json(out + "/dora/adapter/adapter_config.json")["use_dora"] == true);
  // As if killed after the checkpoints of step 6.
  fs::rename(out + "/dora/adapter", tmp / "dora-whole");
  fs::remove(out + "/dora/job_state.json");
  const auto resumed = train_recipe(recipe, "--resume " + q(out));
  INFO(resumed.err);
  REQUIRE(resumed.code == 0);
  REQUIRE_THAT(resumed.err, Catch::Contains("[dora] resuming from"));
  REQUIRE(adapter_diff(out + "/dora/adapter", tmp / "dora-whole") < 1e-5);
}

TEST_CASE("max_concurrent runs jobs in turn, and --resume resumes each job", "[cli][jobs]") {
  TempDir tmp;
  const auto out = tmp / "run";
  const auto recipe = write_recipe(tmp, "jobs.yaml", jobs_recipe(out, "max_concurrent: 2"));
  const auto r = train_recipe(recipe);
  INFO(r.err);
  REQUIRE(r.code == 0);
  // Two at a time: multi waits for the first to finish (short, the fewest steps).
  const auto started = [&](const std::string& name) { return r.err.find("[" + name + "] starts"); };
  const auto finished = r.err.find("[short] adapter written");
  REQUIRE(started("qv") < finished);
  REQUIRE(started("short") < finished);
  REQUIRE(started("multi") > finished);
  REQUIRE(started("mix") > r.err.find("adapter written", finished + 1));

  // As if the run had been killed after the checkpoints of step 6: two jobs unfinished.
  for (const char* name : {"qv", "mix"}) {
    fs::rename(out + "/" + name + "/adapter", tmp / (std::string(name) + "-whole"));
    fs::remove(out + "/" + name + "/job_state.json");
  }
  const auto resumed = train_recipe(recipe, "--resume " + q(out));
  INFO(resumed.err);
  REQUIRE(resumed.code == 0);
  REQUIRE_THAT(resumed.err, Catch::Contains("[short] finished earlier"));
  REQUIRE_THAT(resumed.err, Catch::Contains("[multi] finished earlier"));
  REQUIRE_THAT(resumed.err, Catch::Contains("[qv] resuming from"));
  REQUIRE_THAT(resumed.err, Catch::Contains("[mix] resuming from"));
  for (const char* name : {"qv", "mix"}) {
    INFO(name);
    REQUIRE(adapter_diff(out + "/" + name + "/adapter", tmp / (std::string(name) + "-whole")) <
            1e-5);
  }
}

TEST_CASE("a job whose loss turns non-finite stops alone and the others go on", "[cli][jobs]") {
  TempDir tmp;
  const auto out = tmp / "run";
  const auto recipe = write_recipe(tmp, "jobs.yaml", jobs_recipe(out) + R"(  - name: wild
    train: {lr: 1.0e+30, warmup_steps: 0, max_grad_norm: 0, save_every: 1}
)");
  const auto r = train_recipe(recipe);
  INFO(r.err);
  REQUIRE(r.code == 2);
  REQUIRE_THAT(r.err, Catch::Contains("job 'wild': the training loss became") &&
                          Catch::Contains("the other jobs go on"));
  REQUIRE(fs::exists(out + "/wild/checkpoints/step-1"));
  REQUIRE_FALSE(fs::exists(out + "/wild/adapter"));
  for (const auto& name : kJobs) REQUIRE(fs::exists(out + "/" + name + "/adapter"));
}

TEST_CASE("bad jobs are named before anything loads or is written", "[cli][jobs]") {
  TempDir tmp;
  const auto out = tmp / "run";
  const auto recipe = write_recipe(tmp, "jobs.yaml", jobs_recipe(out) + R"(  - name: nodata
    data: {train: missing.jsonl}
  - name: typo
    adapter: {type: lorra}
)");
  for (const char* command : {"train", "validate"}) {
    const auto r = run_lorafit(std::string(command) + " " + q(recipe));
    INFO(r.err);
    REQUIRE(r.code == 2);
    REQUIRE_THAT(r.err, Catch::Contains("job 'nodata': 'data.train': file 'missing.jsonl'"));
    REQUIRE_THAT(r.err, Catch::Contains("job 'typo': 'adapter.type' is 'lorra'"));
    REQUIRE_FALSE(fs::exists(out));
  }
}
