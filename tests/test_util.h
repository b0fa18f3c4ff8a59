// Shared helpers for the tests: fixture paths, reference numbers, temporary folders, and
// running the lorafit binary.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <catch2/catch.hpp>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <thread>

#include "core/run_dir.h"
#include "core/safetensors.h"

namespace lorafit::test {

namespace fs = std::filesystem;

/// tests/fixtures/NAME (made by scripts/make_reference_fixtures.py).
inline std::string fixture(const std::string& name) {
  return std::string(LORAFIT_FIXTURES) + "/" + name;
}

/// The pretrained model the repository ships: recipes/models/stories260k.
inline std::string stories260k() {
  return std::string(LORAFIT_FIXTURES) + "/../../recipes/models/stories260k";
}

inline std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline void write_text(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

inline nlohmann::json read_json(const std::string& path) {
  return nlohmann::json::parse(read_text(path));
}

/// A fresh folder under the system's temporary directory, removed when the object dies.
struct TempDir {
  fs::path path;
  TempDir() {
    std::random_device rd;
    path =
        fs::temp_directory_path() / ("lorafit-test-" + std::to_string(rd()) + std::to_string(rd()));
    fs::create_directories(path);
  }
  ~TempDir() { remove_tree(path); }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

/// Copies the folder `src` to `dest` (which must not exist) with cp: std::filesystem::copy of
/// a folder crashes programs linked against the pip LibTorch, as remove_all does (see
/// remove_tree).
inline void copy_folder(const std::string& src, const std::string& dest) {
  REQUIRE(std::system(("cp -r '" + src + "' '" + dest + "'").c_str()) == 0);
}

/// Copies a fixture folder into `dest` and returns dest.
inline std::string copy_fixture(const std::string& name, const std::string& dest) {
  copy_folder(fixture(name), dest);
  return dest;
}

/// `s` in single quotes, for a shell command line.
inline std::string quote(const std::string& s) {
  return "'" + s + "'";
}

struct RunResult {
  int code = -1;
  std::string out;
  std::string err;
};

/// Runs `lorafit ARGS` through the shell (args are quoted by the caller), capturing both
/// streams. `stdin_text`, if given, is piped to standard input; `env` ("NAME=value ...") is
/// set for it.
inline RunResult run_lorafit(const std::string& args,
                             const std::string& stdin_text = "",
                             const std::string& env = "") {
  TempDir tmp;
  const auto out = tmp / "out", err = tmp / "err", in = tmp / "in";
  write_text(in, stdin_text);
  const std::string cmd =
      env + " '" + LORAFIT_BIN + "' " + args + " <'" + in + "' >'" + out + "' 2>'" + err + "'";
  const int status = std::system(cmd.c_str());
  RunResult r;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = read_text(out);
  r.err = read_text(err);
  return r;
}

/// Starts `lorafit ARGS` in the background (args quoted by the caller, `env` as for
/// run_lorafit), its stderr into `err_path`; returns its pid, for kill and exit_code.
inline pid_t start_lorafit(const std::string& args,
                           const std::string& err_path,
                           const std::string& env = "") {
  const pid_t pid = fork();
  if (pid == 0) {
    const std::string cmd =
        "exec env " + env + " '" + LORAFIT_BIN + "' " + args + " >/dev/null 2>'" + err_path + "'";
    execl("/bin/sh", "sh", "-c", cmd.c_str(), nullptr);
    _exit(127);
  }
  return pid;
}

/// Waits for a process from start_lorafit: its exit code, or 128 + the signal that ended it.
inline int exit_code(pid_t pid) {
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/// exit_code, but a process still running after `seconds` is killed and gives -1, so that a
/// hang fails the test instead of stalling the suite.
inline int exit_code_within(pid_t pid, double seconds) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  int status = 0;
  while (waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/// The values of `key` in OUT/metrics.jsonl, in order.
inline std::vector<double> metric(const std::string& out, const char* key) {
  std::vector<double> v;
  std::ifstream in(out + "/metrics.jsonl");
  for (std::string line; std::getline(in, line);) {
    const auto j = nlohmann::json::parse(line);
    if (j.contains(key)) v.push_back(j[key]);
  }
  return v;
}

/// The pid of a process that has ended (for temporary names a dead process left).
inline pid_t dead_pid() {
  const pid_t pid = fork();
  if (pid == 0) _exit(0);
  waitpid(pid, nullptr, 0);
  return pid;
}

/// max |a - b| / max |b|: the relative error used against reference outputs.
template <typename T>
double rel_err(const T& a, const T& b) {
  return (a - b).abs().max().template item<double>() / b.abs().max().template item<double>();
}

/// rel_err for tensors of any dtype and device: the difference taken in float64, and no
/// division by zero for an all-zero reference.
inline double rel_err_f64(const torch::Tensor& a, const torch::Tensor& ref) {
  const auto r = ref.to(torch::kFloat64);
  return (a.to(torch::kFloat64) - r).abs().max().item<double>() /
         std::max(r.abs().max().item<double>(), 1e-30);
}

/// The largest difference between the tensors of two adapter folders (same names required).
inline double adapter_diff(const std::string& a_dir, const std::string& b_dir) {
  SafetensorsFile a(a_dir + "/adapter_model.safetensors");
  SafetensorsFile b(b_dir + "/adapter_model.safetensors");
  REQUIRE(a.header().entries.size() == b.header().entries.size());
  double worst = 0;
  for (const auto& e : a.header().entries)
    worst = std::max(worst, (a.tensor(e.name) - b.tensor(e.name)).abs().max().item<double>());
  return worst;
}

/// y's value, then the gradient that y.backward(upstream) gives each of `inputs`, which is
/// cleared after so that the next call starts from none.
inline std::vector<torch::Tensor> value_and_grads(const torch::Tensor& y,
                                                  const torch::Tensor& upstream,
                                                  const std::vector<torch::Tensor>& inputs) {
  y.backward(upstream);
  std::vector<torch::Tensor> out{y.detach()};
  for (auto t : inputs) {
    out.push_back(t.grad().clone());
    t.mutable_grad().reset();
  }
  return out;
}

/// Gradients of a recomputing backward pass (checkpointed layers) against the plain one's:
/// as many, each nonzero, equal to float64 round-off.
inline void require_same_gradients(const std::vector<torch::Tensor>& plain,
                                   const std::vector<torch::Tensor>& checkpointed) {
  REQUIRE(plain.size() == checkpointed.size());
  for (size_t i = 0; i < plain.size(); ++i) {
    INFO("gradient " << i);
    REQUIRE(plain[i].abs().sum().item<double>() > 0);
    REQUIRE(torch::allclose(plain[i], checkpointed[i], 1e-10, 1e-12));
  }
}

}  // namespace lorafit::test
