// Data-parallel `lorafit train`: ranks as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR,
// MASTER_PORT), on the CPU through Gloo on 127.0.0.1.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "core/safetensors.h"
#include "test_util.h"

using namespace lorafit;
namespace fs = std::filesystem;
using lorafit::test::read_text;
using lorafit::test::run_lorafit;
constexpr auto q = lorafit::test::quote;
using lorafit::test::exit_code;
using lorafit::test::TempDir;
using Clock = std::chrono::steady_clock;

namespace {

// A TCP port on 127.0.0.1 that nothing listens on now.
int free_port() {
  const int s = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(bind(s, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  socklen_t len = sizeof addr;
  getsockname(s, reinterpret_cast<sockaddr*>(&addr), &len);
  close(s);
  return ntohs(addr.sin_port);
}

std::string rank_env(int rank, int world, int port) {
  return "RANK=" + std::to_string(rank) + " LOCAL_RANK=" + std::to_string(rank) +
         " WORLD_SIZE=" + std::to_string(world) +
         " MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(port);
}

// Starts `lorafit ARGS` as rank `rank` of `world`, its stderr into `err`.
pid_t spawn_rank(int rank, int world, int port, const std::string& args, const std::string& err) {
  return lorafit::test::start_lorafit(args, err, rank_env(rank, world, port));
}

// Runs `lorafit ARGS` as `world` ranks at once; each rank's exit code and stderr.
std::vector<lorafit::test::RunResult> run_ranks(int world, const std::string& args) {
  TempDir tmp;
  const int port = free_port();
  std::vector<pid_t> pids;
  for (int r = 0; r < world; ++r)
    pids.push_back(spawn_rank(r, world, port, args, tmp / ("err" + std::to_string(r))));
  std::vector<lorafit::test::RunResult> out(world);
  for (int r = 0; r < world; ++r) {
    out[r].code = exit_code(pids[r]);
    out[r].err = read_text(tmp / ("err" + std::to_string(r)));
  }
  return out;
}

// The largest difference between the tensors of two safetensors files (same names).
double max_diff(const std::string& a_path, const std::string& b_path) {
  SafetensorsFile a(a_path), b(b_path);
  REQUIRE(a.header().entries.size() == b.header().entries.size());
  double worst = 0;
  for (const auto& e : a.header().entries) {
    const auto x = a.tensor(e.name).to(torch::kFloat64), y = b.tensor(e.name).to(torch::kFloat64);
    worst = std::max(worst, (x - y).abs().max().item<double>());
  }
  return worst;
}

const std::string kTrain =
    "train recipes/tiny.yaml --device cpu --set train.steps=8 "
    "--set train.save_every=4 --set train.eval_every=4 --set train.log_every=2 ";

}  // namespace

TEST_CASE("two and three ranks train what one process trains on the same global batch",
          "[cli][dist]") {
  // Every strategy that trains; the files that hold what it trained; whether three ranks run
  // it too (on a global batch of 12).
  struct Case {
    std::string name, sets;
    std::vector<std::string> files;
    bool three = false;
  };
  const std::vector<Case> cases = {
      {"lora, 2 micro-batches per rank",
       "--set train.micro_batch_size=2",
       {"adapter/adapter_model.safetensors"},
       true},
      {"multilora", "--set adapter.type=multilora", {"adapter/adapter_model.safetensors"}},
      {"dora", "--set adapter.type=dora", {"adapter/adapter_model.safetensors"}},
      {"mixlora",
       "--set adapter.type=mixlora --set adapter.num_experts=4 "
       "--set adapter.router_aux_loss_coef=0.01",
       {"adapter/adapter_model.safetensors"},
       true},
      {"cola", "--set cola.links=2", {"adapter/adapter_model.safetensors"}, true},
      {"longlora",
       "--set longlora.group_ratio=0.25 --set 'longlora.trainable=[embed, norm]'",
       {"adapter/adapter_model.safetensors"}},
      {"full", "--set adapter.type=full --set train.lr=1e-3", {"model/model.safetensors"}, true},
  };
  const std::string three = "--set train.batch_size=12 --set train.micro_batch_size=2 ";
  TempDir tmp;
  for (const auto& c : cases) {
    INFO(c.name);
    for (int world : {2, 3}) {
      if (world == 3 && !c.three) continue;
      INFO(world << " ranks");
      const auto sets = kTrain + c.sets + " " + (world == 3 ? three : "");
      const auto name = c.name + "-" + std::to_string(world);
      const auto one = run_lorafit(sets + " --set output=" + q(tmp / (name + "-1")));
      INFO(one.err);
      REQUIRE(one.code == 0);
      const auto ranks = run_ranks(world, sets + " --set output=" + q(tmp / name));
      for (const auto& r : ranks) {
        INFO(r.err);
        REQUIRE(r.code == 0);
      }
      for (const auto& f : c.files)
        REQUIRE(max_diff(tmp / (name + "-1/") + f, tmp / (name + "/") + f) < 1e-6);
      // Rank 0 alone logs and writes.
      REQUIRE_THAT(ranks[0].err, Catch::Contains("step 8/8"));
      for (int r = 1; r < world; ++r) REQUIRE(ranks[r].err.empty());
    }
  }

  for (int world : {2, 3}) {  // jobs
    INFO(world << " ranks, jobs");
    const std::string args = "train recipes/jobs.yaml --device cpu --set train.steps=6 " +
                             (world == 3 ? three : std::string());
    const auto name = "jobs-" + std::to_string(world);
    REQUIRE(run_lorafit(args + "--set output=" + q(tmp / (name + "-1"))).code == 0);
    const auto ranks = run_ranks(world, args + "--set output=" + q(tmp / name));
    for (const auto& r : ranks) {
      INFO(r.err);
      REQUIRE(r.code == 0);
    }
    for (const char* job : {"qv", "wide", "mix"}) {
      INFO(job);
      const std::string f = std::string("/") + job + "/adapter/adapter_model.safetensors";
      REQUIRE(max_diff(tmp / (name + "-1") + f, tmp / name + f) < 1e-6);
    }
  }

  {  // --resume with the same world size
    const auto whole = tmp / "lora, 2 micro-batches per rank-2";
    const auto out = tmp / "resumed";
    lorafit::test::copy_folder(whole, out);
    remove_tree(out + "/adapter");
    const auto two = run_ranks(2, kTrain + "--set train.micro_batch_size=2 --set output=" + q(out) +
                                      " --resume " + q(out + "/checkpoints/step-4"));
    INFO(two[0].err);
    REQUIRE(two[0].code == 0);
    REQUIRE(two[1].code == 0);
    REQUIRE_THAT(two[0].err, Catch::Contains("resuming from"));
    REQUIRE(max_diff(out + "/adapter/adapter_model.safetensors",
                     whole + "/adapter/adapter_model.safetensors") < 1e-6);
  }
}

TEST_CASE("full fine-tuning splits its optimizer state over the ranks and resumes from it",
          "[cli][dist]") {
  TempDir tmp;
  const std::string full = kTrain + "--set adapter.type=full --set train.lr=1e-3 ";
  // The state a rank holds falls as 1/N (12 bytes an element: master, two moments).
  double one_process = 0;
  std::vector<double> per_rank;
  for (int world : {2, 3}) {
    const auto ranks =
        run_ranks(world, full + (world == 3 ? "--set train.batch_size=12 " : "") +
                             "--set output=" + q(tmp / ("w" + std::to_string(world))));
    INFO(ranks[0].err);
    REQUIRE(ranks[0].code == 0);
    const auto at = ranks[0].err.find("optimizer state split over " + std::to_string(world));
    REQUIRE(at != std::string::npos);
    double mine = 0, whole = 0;
    REQUIRE(std::sscanf(ranks[0].err.c_str() + at,
                        "optimizer state split over %*d ranks: %lf MiB a rank (one process: %lf",
                        &mine, &whole) == 2);
    per_rank.push_back(mine);
    one_process = whole;
  }
  // fp32 weights: one process holds the two moments (8 bytes an element), a rank 12 / N.
  REQUIRE(per_rank[0] == Approx(one_process * 12 / 8 / 2).epsilon(0.01));
  REQUIRE(per_rank[1] == Approx(one_process * 12 / 8 / 3).epsilon(0.01));

  // A checkpoint holds the whole state, gathered: resuming from it ends where the run did.
  const auto whole = tmp / "w2";
  const auto out = tmp / "resumed";
  lorafit::test::copy_folder(whole, out);
  remove_tree(out + "/model");
  const auto two =
      run_ranks(2, full + "--set output=" + q(out) + " --resume " + q(out + "/checkpoints/step-4"));
  INFO(two[0].err);
  REQUIRE(two[0].code == 0);
  REQUIRE(two[1].code == 0);
  REQUIRE_THAT(two[0].err, Catch::Contains("resuming from"));
  REQUIRE(max_diff(out + "/model/model.safetensors", whole + "/model/model.safetensors") < 1e-6);
}

TEST_CASE("the gradients' all-reduce starts while the backward still runs", "[cli][dist]") {
  // Buckets of 10 kB: a few tensors each. metrics.jsonl says, per step, how many buckets
  // started from the hook that marks a gradient final, and how many gradients the backward
  // finished after the first bucket had started: more than none means the first all-reduce
  // started before the backward ended.
  TempDir tmp;
  const auto ranks = run_ranks(2, kTrain +
                                      "--set train.micro_batch_size=2 --set train.log_every=1 "
                                      "--set distributed.bucket_mb=0.01 --set output=" +
                                      q(tmp / "out"));
  for (const auto& r : ranks) {
    INFO(r.err);
    REQUIRE(r.code == 0);
  }
  int steps = 0;
  std::istringstream lines(read_text(tmp / "out/metrics.jsonl"));
  for (std::string line; std::getline(lines, line);) {
    const auto j = nlohmann::json::parse(line);
    if (!j.contains("allreduce")) continue;
    INFO(line);
    const auto& a = j["allreduce"];
    REQUIRE(a["buckets"].get<int>() > 2);
    REQUIRE(a["started_in_backward"].get<int>() >= 1);
    REQUIRE(a["grads_after_first_start"].get<int>() > 0);
    ++steps;
  }
  REQUIRE(steps == 8);
}

TEST_CASE("a rank that dies or hangs ends the others with an error naming it", "[cli][dist]") {
  // Rank 1 killed or stopped (perhaps in the middle of a request to rank 0's store), then
  // rank 0, the store's host, killed.
  for (const auto& [victim, sig] : {std::pair{1, SIGKILL}, {1, SIGSTOP}, {0, SIGKILL}}) {
    INFO("rank " << victim << (sig == SIGKILL ? " killed" : " stopped"));
    TempDir tmp;
    const int port = free_port();
    const std::string args = "train recipes/tiny.yaml --device cpu --set output=" + q(tmp / "run") +
                             " --set train.steps=100000 --set train.log_every=1 "
                             "--set train.save_every=0 --set train.eval_every=0 "
                             "--set distributed.timeout_s=5";
    const pid_t r0 = spawn_rank(0, 2, port, args, tmp / "err0");
    const pid_t r1 = spawn_rank(1, 2, port, args, tmp / "err1");
    const auto deadline = Clock::now() + std::chrono::seconds(60);
    while (read_text(tmp / "err0").find("step 3/") == std::string::npos && Clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    const pid_t dead = victim == 1 ? r1 : r0, survivor = victim == 1 ? r0 : r1;
    kill(dead, sig);
    const auto stopped = Clock::now();
    const int code = lorafit::test::exit_code_within(survivor, 60);
    const double secs = std::chrono::duration<double>(Clock::now() - stopped).count();
    kill(dead, SIGKILL);
    exit_code(dead);
    const auto err = read_text(tmp / (victim == 1 ? "err0" : "err1"));
    INFO(err);
    REQUIRE(code == 1);
    if (victim == 1) {
      REQUIRE_THAT(err, Catch::Contains("rank 0 of 2: the all-reduce at step"));
      // Named by its last step when it stopped before reaching this one.
      REQUIRE_THAT(err,
                   Catch::Contains("rank 1 (last at step") || Catch::Contains("rank 1 stopped"));
    } else {
      REQUIRE_THAT(err, Catch::Contains("rank 1 of 2:"));
      REQUIRE_THAT(err, Catch::Contains("rank 0 (the host of the rendezvous store) stopped"));
    }
    REQUIRE(secs < 5 + 10);  // the timeout, and the start of the error's report
  }
}

TEST_CASE("a launch that cannot work is refused before anything connects", "[cli][dist]") {
  TempDir tmp;
  const std::string args = kTrain + "--set output=" + q(tmp / "run");
  const auto bad_rank = run_lorafit(args, "", "RANK=2 WORLD_SIZE=2 MASTER_PORT=1");
  REQUIRE(bad_rank.code == 2);
  REQUIRE_THAT(bad_rank.err, Catch::Contains("RANK 2 is not below WORLD_SIZE 2"));
  // 8 rows per step do not split over 3 ranks of micro-batches of 4.
  const auto uneven = run_lorafit(args, "", "RANK=0 WORLD_SIZE=3 MASTER_PORT=1");
  REQUIRE(uneven.code == 2);
  REQUIRE_THAT(uneven.err, Catch::Contains("must be a multiple of WORLD_SIZE (3)"));
  REQUIRE_FALSE(fs::exists(tmp / "run"));
}
