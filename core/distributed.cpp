// c10d's headers declare a backend only where its USE_C10D_ macro is defined (some LibTorch
// CMake configs define them for their users); CMake says which backends this LibTorch has.
#if defined(LORAFIT_WITH_GLOO) && !defined(USE_C10D_GLOO)
#define USE_C10D_GLOO
#endif
#if defined(LORAFIT_WITH_NCCL) && !defined(USE_C10D_NCCL)
#define USE_C10D_NCCL
#endif

#include "core/distributed.h"

#include <fmt/core.h>

#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef LORAFIT_WITH_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#ifdef LORAFIT_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <cstdlib>

#include "core/compat.h"
#include "core/errors.h"

namespace lorafit {

namespace {

// An integer environment variable, `fallback` when unset.
int64_t env_int(const char* name, int64_t fallback, std::vector<std::string>& problems) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  const long long x = std::strtoll(v, &end, 10);
  if (*end != '\0' || x < 0) {
    problems.push_back(std::string(name) + "='" + v + "' is not a whole number >= 0");
    return fallback;
  }
  return x;
}

std::string step_key(int64_t rank) {
  return "lorafit/step/" + std::to_string(rank);
}

}  // namespace

Launch launch_from_env() {
  Launch l;
  std::vector<std::string> problems;
  l.world_size = env_int("WORLD_SIZE", 1, problems);
  l.rank = env_int("RANK", 0, problems);
  l.local_rank = env_int("LOCAL_RANK", l.rank, problems);
  l.master_port = env_int("MASTER_PORT", l.master_port, problems);
  if (const char* a = std::getenv("MASTER_ADDR"); a && *a) l.master_addr = a;
  if (l.world_size > 1) {
    if (!std::getenv("RANK")) problems.push_back("WORLD_SIZE is set but RANK is not");
    if (l.rank >= l.world_size)
      problems.push_back("RANK " + std::to_string(l.rank) + " is not below WORLD_SIZE " +
                         std::to_string(l.world_size));
    if (l.master_port < 1 || l.master_port > 65535)
      problems.push_back("MASTER_PORT " + std::to_string(l.master_port) + " is not a port");
  }
  if (l.world_size == 0) problems.push_back("WORLD_SIZE is 0");
  if (!problems.empty()) {
    throw ConfigError("the launch environment is wrong: " + join_problems(problems) +
                      " (hint: launch with torchrun --nproc-per-node N --no-python lorafit "
                      "train RECIPE, or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)");
  }
  return l;
}

struct World::Impl {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<compat::CollectiveBackend> group;
  int64_t bucket_bytes = 0;
  bool failed = false;  // a collective failed: a peer may be dead or hung

  // Which rank stopped, as far as the store can tell: the ranks behind `step`. When the store
  // does not answer, its host (rank 0) stopped, or, seen from rank 0 itself, a peer that
  // stopped in the middle of a request holds the store's server up.
  std::string stopped(const Launch& l, int64_t step) const {
    std::vector<std::string> behind, others;
    for (int64_t r = 0; r < l.world_size; ++r)
      if (r != l.rank) others.push_back(std::to_string(r));
    auto some_peer = [&] {
      return others.size() == 1 ? "rank " + others[0] + " stopped"
                                : "one of ranks " + join_problems(others) + " stopped";
    };
    try {
      store->setTimeout(std::chrono::seconds(2));
      for (int64_t r = 0; r < l.world_size; ++r) {
        if (r == l.rank) continue;
        if (!store->check({step_key(r)})) {
          behind.push_back("rank " + std::to_string(r) + " (never reached a step)");
          continue;
        }
        const auto v = store->get(step_key(r));
        const int64_t at = std::stoll(std::string(v.begin(), v.end()));
        if (at < step)
          behind.push_back("rank " + std::to_string(r) + " (last at step " + std::to_string(at) +
                           ")");
      }
    } catch (const std::exception&) {
      return l.rank == 0 ? some_peer() : "rank 0 (the host of the rendezvous store) stopped";
    }
    return behind.empty() ? some_peer() : join_problems(behind) + " stopped";
  }
};

World::World(const Launch& launch,
             torch::Device device,
             std::chrono::milliseconds timeout,
             int64_t bucket_bytes)
    : launch_(launch), impl_(std::make_unique<Impl>()) {
  if (launch.world_size <= 1) return;
#ifndef LORAFIT_WITH_NCCL
  // A backend this LibTorch lacks is refused before any rank waits for the others.
  if (device.is_cuda()) throw ConfigError("data parallelism on CUDA needs a LibTorch with NCCL");
#endif
#ifndef LORAFIT_WITH_GLOO
  if (!device.is_cuda()) {
    throw ConfigError(
        "data parallelism on the CPU needs a LibTorch with Gloo (hint: on Debian, install "
        "libgloo-dev and rebuild)");
  }
#endif
  impl_->bucket_bytes = bucket_bytes;
  const int rank = static_cast<int>(launch.rank), size = static_cast<int>(launch.world_size);
  try {
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(launch.master_port);
    opts.isServer = launch.rank == 0;
    opts.numWorkers = static_cast<std::size_t>(size);
    opts.waitWorkers = true;
    opts.timeout = timeout;
    impl_->store = c10::make_intrusive<c10d::TCPStore>(launch.master_addr, opts);
#ifdef LORAFIT_WITH_NCCL
    if (device.is_cuda()) {
      auto options = c10d::ProcessGroupNCCL::Options::create();
      options->timeout = timeout;
      impl_->group = c10::make_intrusive<c10d::ProcessGroupNCCL>(impl_->store, rank, size, options);
    }
#endif
#ifdef LORAFIT_WITH_GLOO
    if (!device.is_cuda()) {
      auto options = c10d::ProcessGroupGloo::Options::create(timeout);
      const bool loopback = launch.master_addr == "127.0.0.1" || launch.master_addr == "localhost";
      if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname && *ifname) {
        options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
      } else {
        options->devices.push_back(
            loopback ? c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1")
                     : c10d::ProcessGroupGloo::createDefaultDevice());
      }
      impl_->group = c10::make_intrusive<c10d::ProcessGroupGloo>(impl_->store, rank, size, options);
    }
#endif
  } catch (const std::exception& e) {
    throw DistributedError(fmt::format(
        "rank {} of {}: could not join the others through {}:{} within {} s: {} (hint: start "
        "every rank, with the same MASTER_ADDR and MASTER_PORT)",
        rank, size, launch.master_addr, launch.master_port, timeout.count() / 1000, e.what()));
  }
}

World::~World() {
  // After a failed collective, the store's server thread can sit in a read from a peer that
  // hangs (stopped mid-request), and destroying the store or the group would join it forever:
  // they are left to the exit that follows.
  if (impl_ && impl_->failed) {
    (void)impl_->group.release();
    (void)impl_->store.release();
  }
}

void World::sum(const std::vector<torch::Tensor>& tensors, int64_t step) {
  if (launch_.world_size <= 1) return;
  auto& im = *impl_;
  try {
    const auto mark = std::to_string(step);
    im.store->set(step_key(launch_.rank), std::vector<uint8_t>(mark.begin(), mark.end()));
    // Buckets of consecutive tensors, flattened into fp32.
    std::vector<std::vector<torch::Tensor>> flat;    // per bucket: {the bucket [n] fp32}
    std::vector<std::pair<size_t, size_t>> members;  // per bucket: [first, last) tensor
    std::vector<torch::Tensor> parts;
    size_t first = 0;
    int64_t bytes = 0;
    auto close = [&](size_t last) {
      if (parts.empty()) return;
      flat.push_back({torch::cat(parts)});
      members.emplace_back(first, last);
      parts.clear();
      first = last;
      bytes = 0;
    };
    for (size_t i = 0; i < tensors.size(); ++i) {
      const int64_t b = tensors[i].numel() * 4;
      if (bytes > 0 && bytes + b > im.bucket_bytes) close(i);
      parts.push_back(tensors[i].reshape({-1}).to(torch::kFloat32));
      bytes += b;
    }
    close(tensors.size());
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    for (auto& bucket : flat) works.push_back(im.group->allreduce(bucket));
    for (size_t k = 0; k < works.size(); ++k) {
      works[k]->wait();
      int64_t offset = 0;
      for (size_t i = members[k].first; i < members[k].second; ++i) {
        const auto n = tensors[i].numel();
        tensors[i].copy_(flat[k][0].narrow(0, offset, n).view(tensors[i].sizes()));
        offset += n;
      }
    }
  } catch (const std::exception& e) {
    std::string cause = e.what();
    cause = cause.substr(0, cause.find('\n'));
    im.failed = true;
    throw DistributedError(fmt::format(
        "rank {} of {}: the all-reduce at step {} failed ({}): {} (hint: see that rank's log; "
        "a rank that dies or hangs ends every other one within distributed.timeout_s)",
        launch_.rank, launch_.world_size, step, cause, im.stopped(launch_, step)));
  }
}

}  // namespace lorafit
