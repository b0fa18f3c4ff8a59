// Data-parallel `lorafit train`: ranks as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR,
// MASTER_PORT), on the CPU through Gloo on 127.0.0.1.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
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

TEST_CASE("two ranks train what one process trains on the same global batch", "[cli][dist]") {
  // Every strategy that trains; the files that hold what it trained.
  struct Case {
    std::string name, sets;
    std::vector<std::string> files;
  };
  const std::vector<Case> cases = {
      {"lora, 2 micro-batches per rank",
       "--set train.micro_batch_size=2",
       {"adapter/adapter_model.safetensors"}},
      {"multilora", "--set adapter.type=multilora", {"adapter/adapter_model.safetensors"}},
      {"dora", "--set adapter.type=dora", {"adapter/adapter_model.safetensors"}},
      {"mixlora",
       "--set adapter.type=mixlora --set adapter.num_experts=4 "
       "--set adapter.router_aux_loss_coef=0.01",
       {"adapter/adapter_model.safetensors"}},
      {"cola", "--set cola.links=2", {"adapter/adapter_model.safetensors"}},
      {"longlora",
       "--set longlora.group_ratio=0.25 --set 'longlora.trainable=[embed, norm]'",
       {"adapter/adapter_model.safetensors"}},
      {"full", "--set adapter.type=full --set train.lr=1e-3", {"model/model.safetensors"}},
  };
  TempDir tmp;
  for (const auto& c : cases) {
    INFO(c.name);
    const auto one = run_lorafit(kTrain + c.sets + " --set output=" + q(tmp / (c.name + "-1")));
    INFO(one.err);
    REQUIRE(one.code == 0);
    const auto two = run_ranks(2, kTrain + c.sets + " --set output=" + q(tmp / (c.name + "-2")));
    INFO(two[0].err);
    INFO(two[1].err);
    REQUIRE(two[0].code == 0);
    REQUIRE(two[1].code == 0);
    for (const auto& f : c.files)
      REQUIRE(max_diff(tmp / (c.name + "-1/") + f, tmp / (c.name + "-2/") + f) < 1e-5);
    // Rank 0 alone logs and writes.
    REQUIRE_THAT(two[0].err, Catch::Contains("step 8/8"));
    REQUIRE(two[1].err.empty());
  }

  {  // jobs
    const std::string args = "train recipes/jobs.yaml --device cpu --set train.steps=6 ";
    REQUIRE(run_lorafit(args + "--set output=" + q(tmp / "jobs-1")).code == 0);
    const auto two = run_ranks(2, args + "--set output=" + q(tmp / "jobs-2"));
    INFO(two[0].err);
    REQUIRE(two[0].code == 0);
    REQUIRE(two[1].code == 0);
    for (const char* job : {"qv", "wide", "mix"}) {
      INFO(job);
      const std::string f = std::string("/") + job + "/adapter/adapter_model.safetensors";
      REQUIRE(max_diff(tmp / "jobs-1" + f, tmp / "jobs-2" + f) < 1e-5);
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
