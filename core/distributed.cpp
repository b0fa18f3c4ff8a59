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

#include <torch/csrc/autograd/function.h>

#include <algorithm>
#include <csignal>
#include <cstdlib>
#include <mutex>

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

// Splits consecutive tensors into fp32 buckets of at most `bucket_bytes` (a larger tensor
// alone): every rank that sees the same tensors gets the same buckets. -> each bucket's first
// index, in order.
std::vector<size_t> bucket_starts(const std::vector<torch::Tensor>& tensors, int64_t bucket_bytes) {
  std::vector<size_t> starts;
  int64_t bytes = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const int64_t b = tensors[i].numel() * 4;
    if (starts.empty() || (bytes > 0 && bytes + b > bucket_bytes)) {
      starts.push_back(i);
      bytes = 0;
    }
    bytes += b;
  }
  return starts;
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
  // Buckets started and not yet waited for, in the order they started.
  struct Pending {
    std::vector<torch::Tensor> tensors;  // where the sums go
    std::vector<torch::Tensor> flat;     // {[n] fp32}, the bucket
    c10::intrusive_ptr<c10d::Work> work;
  };
  std::vector<Pending> pending;

  // Tells the store this rank reached `step`, for stopped() on the other ranks.
  void mark(int64_t rank, int64_t step) {
    const auto v = std::to_string(step);
    store->set(step_key(rank), std::vector<uint8_t>(v.begin(), v.end()));
  }

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
  // A write to a peer that died raises SIGPIPE where the socket code does not pass
  // MSG_NOSIGNAL (the fresh-clone CI once saw a surviving rank end so, exit 141, no message).
  // Ignored, the write fails instead, and the collective's error names the peer.
  std::signal(SIGPIPE, SIG_IGN);
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

int64_t World::bucket_bytes() const {
  return impl_->bucket_bytes;
}

void World::sum(const std::vector<torch::Tensor>& tensors, int64_t step) {
  if (launch_.world_size <= 1) return;
  auto starts = bucket_starts(tensors, impl_->bucket_bytes);
  starts.push_back(tensors.size());
  for (size_t b = 0; b + 1 < starts.size(); ++b)
    start({tensors.begin() + starts[b], tensors.begin() + starts[b + 1]}, step);
  wait_all(step);
}

void World::start(const std::vector<torch::Tensor>& tensors, int64_t step) {
  if (launch_.world_size <= 1) return;
  auto& im = *impl_;
  try {
    if (im.pending.empty()) im.mark(launch_.rank, step);
    std::vector<torch::Tensor> parts;
    for (const auto& t : tensors) parts.push_back(t.reshape({-1}).to(torch::kFloat32));
    Impl::Pending p{tensors, {torch::cat(parts)}, {}};
    p.work = im.group->allreduce(p.flat);
    im.pending.push_back(std::move(p));
  } catch (const std::exception& e) {
    fail(e, step);
  }
}

void World::wait_all(int64_t step) {
  if (launch_.world_size <= 1) return;
  auto& im = *impl_;
  try {
    for (auto& p : im.pending) {
      p.work->wait();
      int64_t offset = 0;
      for (const auto& t : p.tensors) {
        const auto n = t.numel();
        t.copy_(p.flat[0].narrow(0, offset, n).view(t.sizes()));
        offset += n;
      }
    }
    im.pending.clear();
  } catch (const std::exception& e) {
    fail(e, step);
  }
}

torch::Tensor World::all_gather(const torch::Tensor& shard, int64_t step) {
  const auto flat = shard.detach().reshape({-1}).to(torch::kFloat32).contiguous();
  if (launch_.world_size <= 1) return flat.clone();
  auto& im = *impl_;
  try {
    im.mark(launch_.rank, step);
    std::vector<std::vector<torch::Tensor>> outputs(1);
    for (int64_t r = 0; r < launch_.world_size; ++r) outputs[0].push_back(torch::empty_like(flat));
    std::vector<torch::Tensor> inputs{flat};
    im.group->allgather(outputs, inputs)->wait();
    return torch::cat(outputs[0]);
  } catch (const std::exception& e) {
    fail(e, step);
  }
}

void World::fail(const std::exception& e, int64_t step) {
  auto& im = *impl_;
  std::string cause = e.what();
  cause = cause.substr(0, cause.find('\n'));
  im.failed = true;
  im.pending.clear();
  throw DistributedError(fmt::format(
      "rank {} of {}: the all-reduce at step {} failed ({}): {} (hint: see that rank's log; "
      "a rank that dies or hangs ends every other one within distributed.timeout_s)",
      launch_.rank, launch_.world_size, step, cause, im.stopped(launch_, step)));
}

struct OverlappedGradients::State {
  struct Bucket {
    std::vector<torch::Tensor> tensors;  // gradient holders
    size_t waiting = 0;                  // of them, not final yet
  };
  State(World& world, int64_t step) : world(world), step(step) {}

  World& world;
  int64_t step;
  std::vector<Bucket> buckets;    // in the order every rank starts them
  std::vector<size_t> bucket_of;  // per hooked tensor
  struct Hook {
    std::shared_ptr<torch::autograd::Node> accumulator;
    uintptr_t key;
  };
  std::vector<Hook> hooks;
  size_t next = 0;  // the first bucket not started
  Overlap overlap;
  std::mutex mutex;  // the backward may run hooks on a device thread of its own

  // Starts every bucket from `next` on whose gradients are all final.
  void start_ready(bool in_backward) {
    for (; next < buckets.size() && buckets[next].waiting == 0; ++next) {
      std::vector<torch::Tensor> grads;
      for (auto& t : buckets[next].tensors) {
        if (!t.grad().defined()) t.mutable_grad() = torch::zeros_like(t);
        grads.push_back(t.grad());
      }
      world.start(grads, step);
      overlap.started_in_backward += in_backward;
    }
  }

  void final_gradient(size_t tensor) {
    const std::lock_guard<std::mutex> lock(mutex);
    if (next > 0) ++overlap.grads_after_first_start;
    auto& b = buckets[bucket_of[tensor]];
    if (b.waiting > 0 && --b.waiting == 0) start_ready(/*in_backward=*/true);
  }

  void remove_hooks() {
    for (auto& h : hooks) h.accumulator->del_post_hook(h.key);
    hooks.clear();
  }

  // Runs after a tensor's gradient accumulation: its gradient is final for this backward.
  struct FinalGradientHook : torch::autograd::FunctionPostHook {
    FinalGradientHook(State* state, size_t tensor) : state(state), tensor(tensor) {}
    torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                              const torch::autograd::variable_list&) override {
      state->final_gradient(tensor);
      return outputs;
    }
    State* state;
    size_t tensor;
  };
};

OverlappedGradients::OverlappedGradients(World& world) : world_(world) {}

OverlappedGradients::~OverlappedGradients() {
  if (state_) state_->remove_hooks();
}

void OverlappedGradients::arm(const std::vector<std::vector<torch::Tensor>>& jobs, int64_t step) {
  if (state_) state_->remove_hooks();
  state_.reset();
  if (world_.size() <= 1 || jobs.empty()) return;
  state_.reset(new State(world_, step));
  auto& st = *state_;
  for (const auto& forward : jobs) {
    const std::vector<torch::Tensor> tensors(forward.rbegin(), forward.rend());
    const auto starts = bucket_starts(tensors, world_.bucket_bytes());
    for (size_t i = 0, next_start = 0; i < tensors.size(); ++i) {
      if (next_start < starts.size() && starts[next_start] == i) {
        st.buckets.emplace_back();
        ++next_start;
      }
      st.buckets.back().tensors.push_back(tensors[i]);
      const size_t index = st.bucket_of.size();
      st.bucket_of.push_back(st.buckets.size() - 1);
      // A tensor without an accumulator never becomes final here: finish() starts its bucket.
      auto accumulator = torch::autograd::impl::grad_accumulator(tensors[i]);
      if (!accumulator) continue;
      ++st.buckets.back().waiting;
      const auto key =
          accumulator->add_post_hook(std::make_unique<State::FinalGradientHook>(&st, index));
      st.hooks.push_back({std::move(accumulator), key});
    }
  }
}

void OverlappedGradients::finish() {
  if (!state_) return;
  auto& st = *state_;
  st.remove_hooks();
  for (auto& b : st.buckets) b.waiting = 0;  // tensors no row reached: zero gradients
  st.start_ready(/*in_backward=*/false);
  world_.wait_all(st.step);
  last_ = st.overlap;
  last_.buckets = static_cast<int64_t>(st.buckets.size());
  state_.reset();
}

namespace {

// Elements [begin, begin + length) of the tensors laid end to end, in fp32, zeros past their
// end; only the overlapping pieces are copied, never the whole. -> [length]
torch::Tensor slice_of(const std::vector<torch::Tensor>& tensors, int64_t begin, int64_t length) {
  std::vector<torch::Tensor> parts;
  int64_t offset = 0, taken = 0;
  for (const auto& t : tensors) {
    const int64_t from = std::max(begin, offset), to = std::min(begin + length, offset + t.numel());
    if (from < to) {
      parts.push_back(
          t.detach().reshape({-1}).narrow(0, from - offset, to - from).to(torch::kFloat32));
      taken += to - from;
    }
    offset += t.numel();
  }
  const auto options = tensors.front().options().dtype(torch::kFloat32);
  if (taken < length) parts.push_back(torch::zeros({length - taken}, options));
  return torch::cat(parts);
}

// Writes flat [>= their elements] back into the tensors, each in its own dtype.
void write_back(const torch::Tensor& flat, std::vector<torch::Tensor>& tensors) {
  int64_t offset = 0;
  for (auto& t : tensors) {
    t.copy_(flat.narrow(0, offset, t.numel()).view(t.sizes()));
    offset += t.numel();
  }
}

}  // namespace

ShardedAdamW::ShardedAdamW(World& world_, std::vector<torch::Tensor> model_, const AdamW& full)
    : world(world_), model(std::move(model_)) {
  torch::NoGradGuard no_grad;
  int64_t total = 0;
  for (const auto& t : model) total += t.numel();
  shard = (total + world.size() - 1) / world.size();
  auto mine = [&](const std::vector<torch::Tensor>& tensors) {
    return slice_of(tensors, world.rank() * shard, shard);
  };
  local.emplace(std::vector<torch::Tensor>{mine(full.params).requires_grad_(true)}, full.settings);
  local->exp_avg[0].copy_(mine(full.exp_avg));
  local->exp_avg_sq[0].copy_(mine(full.exp_avg_sq));
  local->steps = full.steps;
}

torch::Tensor ShardedAdamW::step(double lr, double max_grad_norm, int64_t step_number) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> grads;
  for (auto& t : model) {
    grads.push_back(t.grad().defined() ? t.grad() : torch::zeros_like(t));
    t.mutable_grad().reset();
  }
  auto& master = local->params[0];
  master.mutable_grad() = slice_of(grads, world.rank() * shard, shard);
  grads.clear();
  const auto norm = local->step(lr, max_grad_norm, [&](torch::Tensor squared) {
    world.sum({squared}, step_number);
    return squared;
  });
  write_back(world.all_gather(master, step_number), model);
  return norm;
}

void ShardedAdamW::gather(std::optional<AdamW>& optimizer,
                          std::optional<MasterWeights>& masters) const {
  torch::NoGradGuard no_grad;
  const auto at = local->steps;
  const auto weights = world.all_gather(local->params[0], at);
  const auto m = world.all_gather(local->exp_avg[0], at),
             v = world.all_gather(local->exp_avg_sq[0], at);
  // What new_optimizer holds: masters for the tensors not in fp32, in the model's order.
  std::vector<torch::Tensor> low, params;
  for (const auto& t : model)
    if (t.scalar_type() != torch::kFloat32) low.push_back(t);
  masters.reset();
  if (!low.empty()) masters.emplace(low);
  size_t next = 0;
  for (const auto& t : model)
    params.push_back(t.scalar_type() != torch::kFloat32 ? masters->masters[next++] : t);
  write_back(weights, params);
  optimizer.emplace(params, local->settings);
  write_back(m, optimizer->exp_avg);
  write_back(v, optimizer->exp_avg_sq);
  optimizer->steps = local->steps;
}

}  // namespace lorafit
