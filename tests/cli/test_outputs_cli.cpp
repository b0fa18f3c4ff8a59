// What `lorafit train` and `merge` leave in their output folders when runs are resumed,
// repeated, run twice at once, killed, interrupted or starved of disk: never a claim that the
// folder does not back up, never a mix of two runs, never litter a later run keeps.
#include <signal.h>
#include <sys/wait.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <regex>
#include <thread>

#include "core/safetensors.h"
#include "test_util.h"

using namespace lorafit;
namespace fs = std::filesystem;
using lorafit::test::dead_pid;
using lorafit::test::metric;
using lorafit::test::read_text;
using lorafit::test::run_lorafit;
using lorafit::test::TempDir;
using lorafit::test::write_text;
constexpr auto q = lorafit::test::quote;

namespace {

const std::string kRecipe = "recipes/tiny.yaml";
const std::string kModel = "tests/fixtures/gqa_llama3/model";

// `lorafit train` of recipes/tiny.yaml into `out`; `env` prefixes the command (a time
// limit, a file-size limit).
lorafit::test::RunResult train(const std::string& out,
                               const std::string& args = "",
                               const std::string& env = "") {
  return run_lorafit("train " + kRecipe + " --device cpu --set output=" + q(out) + " " + args, "",
                     env);
}

// Every path under `dir` whose name has a ".tmp-" part: what a run must not leave behind.
std::vector<std::string> temporaries(const std::string& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(dir, ec);
       it != fs::recursive_directory_iterator(); ++it) {
    if (it->path().filename().string().find(".tmp-") != std::string::npos)
      out.push_back(it->path().string());
  }
  return out;
}

// Waits until `pred` holds, at most `seconds`.
template <class F>
bool wait_for(F pred, int seconds = 60) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return true;
}

// A finished job's outputs are all there and readable.
void require_complete_adapter(const std::string& out) {
  const auto dir = out + "/adapter";
  REQUIRE(lorafit::test::read_json(dir + "/adapter_config.json")["peft_type"] == "LORA");
  SafetensorsFile file(dir + "/adapter_model.safetensors");
  REQUIRE(file.header().entries.size() == 2 * 7 * 2);  // 2 layers x 7 projections x (A, B)
}

}  // namespace

TEST_CASE("a resume at or past the recipe's steps finishes at once with the outputs",
          "[cli][outputs]") {
  TempDir tmp;
  const auto out = tmp / "run";
  REQUIRE(train(out, "--set train.steps=20 --set train.save_every=10").code == 0);
  REQUIRE(fs::exists(out + "/checkpoints/step-20"));  // the last step is saved too

  // From step 10 with steps lowered to 4: no step to take, the checkpoint's adapter is the
  // output. (This once trained on without end.)
  const auto short_run = tmp / "short";
  const auto r = train(
      short_run,
      "--set train.steps=4 --set train.save_every=10 --resume " + q(out + "/checkpoints/step-10"),
      "timeout 120");
  INFO(r.err);
  REQUIRE(r.code == 0);
  REQUIRE_THAT(r.err, Catch::Contains("nothing left to train"));
  SafetensorsFile written(short_run + "/adapter/adapter_model.safetensors");
  SafetensorsFile saved(out + "/checkpoints/step-10/adapter_model.safetensors");
  for (const auto& e : saved.header().entries) {
    INFO(e.name);
    REQUIRE(torch::equal(written.tensor(e.name), saved.tensor(e.name)));
  }
  REQUIRE(lorafit::test::read_json(short_run + "/job_state.json")["step"] == 10);

  // The finished run resumed as it is: nothing to do, nothing rewritten.
  const auto before = read_text(out + "/metrics.jsonl");
  const auto again = train(out, "--set train.steps=20 --set train.save_every=10 --resume " + q(out),
                           "timeout 120");
  INFO(again.err);
  REQUIRE(again.code == 0);
  REQUIRE_THAT(again.err, Catch::Contains("finished earlier"));
  REQUIRE(read_text(out + "/metrics.jsonl") == before);

  // More steps on resume go on from the last checkpoint, the end of the first run.
  const auto longer = train(
      out, "--set train.steps=24 --set train.save_every=10 --resume " + q(out), "timeout 120");
  INFO(longer.err);
  REQUIRE(longer.code == 0);
  REQUIRE_THAT(longer.err, Catch::Contains("step 20"));
  REQUIRE(lorafit::test::read_json(out + "/job_state.json")["step"] == 24);
}

TEST_CASE("a resume with a changed recipe is refused with the differences", "[cli][outputs]") {
  TempDir tmp;
  const auto out = tmp / "run";
  REQUIRE(train(out, "--set train.steps=6 --set train.save_every=3").code == 0);
  const auto recipe = read_text(out + "/recipe.yaml");
  const auto r = train(out, "--set train.steps=6 --set train.lr=1e-3 --set adapter.r=4 --resume " +
                                q(out + "/checkpoints/step-3"));
  REQUIRE(r.code == 2);
  REQUIRE_THAT(r.err, Catch::Contains("train.lr: 0.005 -> 0.001") &&
                          Catch::Contains("adapter.r: 8 -> 4") && Catch::Contains("--overwrite"));
  REQUIRE(read_text(out + "/recipe.yaml") == recipe);
}

TEST_CASE("train refuses a folder that holds another run unless told to overwrite it",
          "[cli][outputs]") {
  TempDir tmp;
  const auto out = tmp / "run";
  const std::string sets = "--set train.steps=4 --set train.save_every=2 --set train.log_every=1";
  REQUIRE(train(out, sets).code == 0);
  const auto metrics = read_text(out + "/metrics.jsonl");

  const auto again = train(out, sets + " --set seed=1");
  REQUIRE(again.code == 2);
  REQUIRE_THAT(again.err, Catch::Contains("holds another run") && Catch::Contains("--overwrite") &&
                              Catch::Contains("--resume"));
  REQUIRE(read_text(out + "/metrics.jsonl") == metrics);

  const auto both = train(out, sets + " --overwrite --resume " + q(out));
  REQUIRE(both.code == 2);
  REQUIRE_THAT(both.err, Catch::Contains("contradict"));

  // --overwrite: the old run is gone whole, the new one alone is there.
  const auto replaced = train(out,
                              "--set train.steps=3 --set seed=1 --set train.log_every=1 "
                              "--set train.save_every=0 --overwrite");
  INFO(replaced.err);
  REQUIRE(replaced.code == 0);
  REQUIRE(metric(out, "loss").size() == 3);
  REQUIRE_FALSE(fs::exists(out + "/checkpoints/step-2"));
  REQUIRE_THAT(read_text(out + "/recipe.yaml"), Catch::Contains("seed: 1"));
  require_complete_adapter(out);
  REQUIRE(temporaries(tmp.path.string()).empty());

  // An empty folder is a fresh one.
  fs::create_directories(tmp / "empty");
  REQUIRE(train(tmp / "empty", "--set train.steps=2").code == 0);
}

TEST_CASE("a second run into an output in use exits 2 naming the first run's pid",
          "[cli][outputs]") {
  TempDir tmp;
  const auto out = tmp / "run";
  const pid_t first = lorafit::test::start_lorafit(
      "train " + kRecipe + " --device cpu --set output=" + q(out) +
          " --set train.steps=150 --set train.log_every=1 --set train.save_every=50",
      tmp / "first.err");
  // The first run holds the lock once its pid is in the lock file.
  REQUIRE(
      wait_for([&] { return read_text(out + "/.lorafit.lock") == std::to_string(first) + "\n"; }));
  const auto second = train(out, "--set train.steps=150 --set seed=1");
  REQUIRE(second.code == 2);
  REQUIRE_THAT(second.err, Catch::Contains("in use by another lorafit run (pid " +
                                           std::to_string(first) + ")"));
  // --overwrite does not take a live run's folder either.
  const auto overwrite = train(out, "--set train.steps=150 --set seed=1 --overwrite");
  REQUIRE(overwrite.code == 2);
  REQUIRE_THAT(overwrite.err, Catch::Contains("in use"));

  INFO(read_text(tmp / "first.err"));
  REQUIRE(lorafit::test::exit_code(first) == 0);
  const auto losses = metric(out, "loss");
  REQUIRE(losses.size() == 150);  // every step once
  REQUIRE_THAT(read_text(out + "/recipe.yaml"), Catch::Contains("seed: 0"));
  require_complete_adapter(out);
}

TEST_CASE("a full disk at the final write never leaves a claim of a finished run",
          "[cli][outputs]") {
  TempDir tmp;
  const auto out = tmp / "run";
  // Files may grow to 32 KiB (ulimit -f counts 512-byte blocks): the recipe, metrics and plot
  // fit, the 64 KiB adapter does not. SIGXFSZ is ignored so that the write fails as on a full
  // disk.
  const auto r =
      train(out, "--set train.steps=5 --set train.save_every=0", "trap '' XFSZ; ulimit -f 64;");
  INFO(r.err);
  REQUIRE(r.code == 2);
  REQUIRE_THAT(r.err, Catch::Contains("cannot write") && Catch::Contains("disk"));
  REQUIRE(fs::exists(out + "/metrics.jsonl"));
  REQUIRE_FALSE(fs::exists(out + "/job_state.json"));
  REQUIRE_FALSE(fs::exists(out + "/adapter"));
  REQUIRE(temporaries(out).empty());
}

TEST_CASE("a run killed at any moment claims to be finished only beside its whole adapter",
          "[cli][outputs]") {
  TempDir tmp;
  const std::string args =
      " --set train.steps=30 --set train.save_every=0 --set train.eval_every=0";
  const auto timed = tmp / "timed";
  const auto start = std::chrono::steady_clock::now();
  REQUIRE(train(timed, args).code == 0);
  const auto whole = std::chrono::steady_clock::now() - start;
  int finished = 0, unfinished = 0;
  for (int trial = 0; trial < 12; ++trial) {
    // Kills spread over the last half of a run, where the outputs are written.
    const auto out = tmp / ("run-" + std::to_string(trial));
    const pid_t pid = lorafit::test::start_lorafit(
        "train " + kRecipe + " --device cpu --set output=" + q(out) + args, "/dev/null");
    std::this_thread::sleep_for(whole / 2 + whole * trial / 20);
    kill(pid, SIGKILL);
    lorafit::test::exit_code(pid);
    INFO("trial " << trial);
    if (fs::exists(out + "/job_state.json")) {
      ++finished;
      require_complete_adapter(out);
    } else {
      ++unfinished;
      if (fs::exists(out + "/adapter")) require_complete_adapter(out);
    }
  }
  WARN(finished << " runs finished before the kill, " << unfinished << " did not");
}

TEST_CASE("a killed run's temporary folders go when the next run starts", "[cli][outputs]") {
  TempDir tmp;
  const auto out = tmp / "run";
  REQUIRE(train(out, "--set train.steps=4 --set train.save_every=2").code == 0);
  // What a run killed while writing leaves: a checkpoint and an adapter half written.
  const auto dead = std::to_string(dead_pid());
  for (const auto& d : {out + "/checkpoints/step-3.tmp-" + dead, out + "/adapter.tmp-" + dead}) {
    fs::create_directories(d);
    write_text(d + "/adapter_model.safetensors", "half");
  }
  write_text(out + "/metrics.jsonl.tmp-" + dead, "half");
  const auto r = train(out, "--set train.steps=6 --set train.save_every=2 --resume " + q(out));
  INFO(r.err);
  REQUIRE(r.code == 0);
  REQUIRE(temporaries(out).empty());
  require_complete_adapter(out);
}

TEST_CASE("a merge killed midway leaves nothing that stops the next one", "[cli][outputs]") {
  TempDir tmp;
  REQUIRE(train(tmp / "run", "--set train.steps=2").code == 0);
  const std::string merge = "merge --model " + kModel + " --adapter " + q(tmp / "run/adapter") +
                            " --out " + q(tmp / "merged");
  // A real kill where one lands before the merge ends, else the litter a kill leaves.
  bool killed_midway = false;
  for (int trial = 0; trial < 10 && !killed_midway; ++trial) {
    const pid_t pid = lorafit::test::start_lorafit(merge, "/dev/null");
    wait_for([&] { return !temporaries(tmp.path.string()).empty() || fs::exists(tmp / "merged"); },
             30);
    kill(pid, SIGKILL);
    lorafit::test::exit_code(pid);
    killed_midway = !fs::exists(tmp / "merged");
    if (!killed_midway) remove_tree(tmp / "merged");
  }
  if (!killed_midway) {
    fs::create_directories(tmp / ("merged.tmp-" + std::to_string(dead_pid())));
    write_text(tmp / ("merged.tmp-" + std::to_string(dead_pid())) + "/config.json", "{");
  }
  const auto r = run_lorafit(merge);
  INFO(r.err);
  REQUIRE(r.code == 0);
  REQUIRE(fs::exists(tmp / "merged/model.safetensors"));
  REQUIRE(temporaries(tmp.path.string()).empty());
}

TEST_CASE("SIGINT and SIGTERM stop after the step with a checkpoint and say how to resume",
          "[cli][outputs]") {
  TempDir tmp;
  const std::string sets =
      " --set train.steps=120 --set train.save_every=0 --set train.log_every=1 "
      "--set adapter.dropout=0.1";
  REQUIRE(train(tmp / "whole", sets).code == 0);
  for (const int sig : {SIGINT, SIGTERM}) {
    INFO(sig);
    const auto out = tmp / ("stopped-" + std::to_string(sig));
    const auto err = tmp / ("err-" + std::to_string(sig));
    const pid_t pid = lorafit::test::start_lorafit(
        "train " + kRecipe + " --device cpu --set output=" + q(out) + sets, err);
    REQUIRE(wait_for([&] { return metric(out, "loss").size() >= 5; }));
    kill(pid, sig);
    REQUIRE(lorafit::test::exit_code(pid) == 128 + sig);
    const auto text = read_text(err);
    INFO(text);
    std::smatch m;
    REQUIRE(std::regex_search(text, m, std::regex("step (\\d+) is saved in (\\S+);")));
    REQUIRE(fs::exists(m[2].str() + "/trainer_state.json"));
    REQUIRE_THAT(text,
                 Catch::Contains(sig == SIGINT ? "stopped by SIGINT" : "stopped by SIGTERM") &&
                     Catch::Contains("--resume " + out));
    REQUIRE_FALSE(fs::exists(out + "/job_state.json"));
    // Resumed, it ends exactly where the uninterrupted run did.
    const auto resumed = train(out, sets + " --resume " + q(out));
    INFO(resumed.err);
    REQUIRE(resumed.code == 0);
    REQUIRE(read_text(out + "/adapter/adapter_model.safetensors") ==
            read_text(tmp / "whole/adapter/adapter_model.safetensors"));
  }
}

TEST_CASE("the NaN stop names a checkpoint that exists or says there is none", "[cli][outputs]") {
  TempDir tmp;
  const std::string wild =
      "--set train.steps=50 --set train.lr=1e30 --set train.warmup_steps=0 "
      "--set train.max_grad_norm=0 ";
  const auto saved = train(tmp / "saved", wild + "--set train.save_every=1");
  REQUIRE(saved.code == 2);
  std::smatch m;
  REQUIRE(std::regex_search(saved.err, m, std::regex("the last good checkpoint is (\\S+) \\(")));
  REQUIRE(fs::exists(m[1].str() + "/adapter_model.safetensors"));
  const auto none = train(tmp / "none", wild + "--set train.save_every=0");
  REQUIRE(none.code == 2);
  REQUIRE_THAT(none.err, Catch::Contains("no checkpoint was written before it"));
}

TEST_CASE("jobs with their own outputs and no top-level output train", "[cli][outputs]") {
  TempDir tmp;
  const auto recipe = tmp / "jobs.yaml";
  write_text(recipe, "model: " + kModel +
                         "\ndevice: cpu\ndata: {train: recipes/data/tiny_train.jsonl, "
                         "max_seq_len: 64}\ntrain: {steps: 3, batch_size: 4, micro_batch_size: "
                         "2, save_every: 0}\nadapter: {type: lora, r: 4}\njobs:\n  - name: a\n"
                         "    output: " +
                         (tmp / "out-a") + "\n  - name: b\n    output: " + (tmp / "out-b") +
                         "\n    adapter: {r: 2}\n");
  const auto v = run_lorafit("validate " + q(recipe));
  INFO(v.err);
  REQUIRE(v.code == 0);
  const auto r = run_lorafit("train " + q(recipe));
  INFO(r.err);
  REQUIRE(r.code == 0);
  for (const char* job : {"out-a", "out-b"})
    REQUIRE(fs::exists(tmp / job + "/adapter/adapter_model.safetensors"));
}

TEST_CASE("user mistakes exit 2 with the problem named before anything is written",
          "[cli][outputs]") {
  TempDir tmp;
  const auto out = tmp / "never";
  write_text(tmp / "a-file", "not a folder");
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"--set output=" + q(out) + " --set data.max_seq_len=1e11", "'data.max_seq_len'"},
      {"--set output=" + q(out) + " --set data.max_seq_len=100000000000", "<= 16777216"},
      {"--set output=" + q(out) + " --set data.max_seq_len=4096", "more than the 256 positions"},
      {"--set output=" + q(tmp / "a-file"), "is a file"},
      {"--set output=" + q(tmp / "a-file/run"), "which is a file"},
  };
  for (const auto& [args, fragment] : cases) {
    INFO(args);
    const auto r = run_lorafit("train " + kRecipe + " --device cpu " + args);
    INFO(r.err);
    REQUIRE(r.code == 2);
    // The error is the last line (train prints the resolved recipe first).
    const auto last = r.err.substr(r.err.rfind("\nlorafit: error: ") + 1);
    REQUIRE_THAT(last, Catch::StartsWith("lorafit: error: ") && Catch::Contains(fragment) &&
                           Catch::Contains("hint"));
    REQUIRE_FALSE(fs::exists(out));
    REQUIRE(read_text(tmp / "a-file") == "not a folder");
  }
  // Past the model's positions on purpose, said in the recipe: accepted.
  REQUIRE(run_lorafit("validate " + kRecipe +
                      " --set data.max_seq_len=512 --set data.allow_longer_context=true")
              .code == 0);

  // A folder where nothing can be created: /sys takes no new folder, even from root.
  std::string unwritable = "/sys/lorafit-test-out";
  if (geteuid() != 0) {
    fs::create_directories(tmp / "locked");
    fs::permissions(tmp / "locked", fs::perms::owner_read | fs::perms::owner_exec);
    unwritable = tmp / "locked/run";
  }
  const auto locked = train(unwritable, "--set train.steps=2");
  INFO(locked.err);
  REQUIRE(locked.code == 2);
  REQUIRE_THAT(locked.err, Catch::Contains("cannot be written") && Catch::Contains("hint"));
  REQUIRE_FALSE(fs::exists(unwritable));

  // The recipe path is a folder.
  const auto folder = run_lorafit("train " + q(tmp.path.string()));
  REQUIRE(folder.code == 2);
  REQUIRE_THAT(folder.err, Catch::Contains("is a folder, not a YAML file"));

  // A checkpoint whose trainer_state.json was cut short.
  const auto run = tmp / "run";
  REQUIRE(train(run, "--set train.steps=4 --set train.save_every=2").code == 0);
  write_text(run + "/checkpoints/step-4/trainer_state.json", "{\"step\": 4, \"epo");
  const auto recipe = read_text(run + "/recipe.yaml");
  const auto damaged =
      train(run, "--set train.steps=6 --set train.save_every=2 --resume " + q(run));
  INFO(damaged.err);
  REQUIRE(damaged.code == 2);
  REQUIRE_THAT(damaged.err, Catch::Contains("step-4/trainer_state.json' is damaged") &&
                                Catch::Contains("--resume " + run + "/checkpoints/step-2"));
  REQUIRE(read_text(run + "/recipe.yaml") == recipe);
}

TEST_CASE("a failed resume writes nothing", "[cli][outputs]") {
  TempDir tmp;
  const auto out = tmp / "fresh";
  const auto r = train(out, "--resume " + q(tmp / "nowhere"));
  REQUIRE(r.code == 2);
  REQUIRE_THAT(r.err, Catch::Contains("no checkpoint found"));
  REQUIRE_FALSE(fs::exists(out));
}
