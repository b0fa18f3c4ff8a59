// Data parallelism on PyTorch's own engine, c10d: one process per device, launched by
// torchrun (or by hand with its environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
// MASTER_PORT); rank 0 hosts the rendezvous store, and the trainable tensors' gradients are
// summed over the ranks through Gloo on the CPU and NCCL on CUDA.
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/errors.h"
#include "core/optimizer.h"

namespace lorafit {

/// This process's place in a launch; one process when WORLD_SIZE is unset or 1.
struct Launch {
  int64_t rank = 0;
  int64_t world_size = 1;
  int64_t local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int64_t master_port = 29500;
};

/// torchrun's environment; a ConfigError naming a variable that is malformed or missing.
Launch launch_from_env();

/// The ranks of a data-parallel run. With one rank nothing connects and sum() returns at once.
class World {
 public:
  /// Connects to the other ranks (Gloo on the CPU, NCCL on CUDA); no wait, at start-up or in a
  /// collective, lasts longer than `timeout`.
  World(const Launch& launch,
        torch::Device device,
        std::chrono::milliseconds timeout,
        int64_t bucket_bytes);
  ~World();
  World(const World&) = delete;
  World& operator=(const World&) = delete;

  int64_t rank() const { return launch_.rank; }
  int64_t size() const { return launch_.world_size; }
  bool main() const { return launch_.rank == 0; }

  int64_t bucket_bytes() const;

  /// Sums the tensors over the ranks, in place (the same shapes on every rank): they travel as
  /// fp32 buckets of at most bucket_bytes, one collective each, all started before the first
  /// is waited for. `step` is where this rank is, for the error that names a rank that stopped.
  void sum(const std::vector<torch::Tensor>& tensors, int64_t step);

  /// Starts summing the tensors over the ranks as one fp32 bucket (copied now, so they may
  /// change after), without waiting: every rank starts the same buckets in the same order.
  void start(const std::vector<torch::Tensor>& tensors, int64_t step);
  /// Waits for every started bucket and writes the sums into its tensors, in place.
  void wait_all(int64_t step);

  /// Every rank's `shard` (the same size on each) in rank order, as fp32.
  /// shard: [S] -> [size() * S]
  torch::Tensor all_gather(const torch::Tensor& shard, int64_t step);

 private:
  [[noreturn]] void fail(const std::exception& e, int64_t step);
  struct Impl;
  Launch launch_;
  std::unique_ptr<Impl> impl_;
};

/// The gradients of the jobs whose step ends with this backward, summed over the ranks while
/// the backward still runs, as DDP's reducer does: a hook after each tensor's gradient
/// accumulation marks it final, and a bucket (at most bucket_bytes of consecutive tensors of
/// one job, in the order the backward finishes them) starts its all-reduce once all its
/// tensors and every bucket before it are final. The buckets start in one order on every rank,
/// job after job, though each rank's backward may finish them in another (fused jobs group
/// rows by length on each rank); accumulation steps arm nothing and so communicate nothing.
class OverlappedGradients {
 public:
  explicit OverlappedGradients(World& world);
  ~OverlappedGradients();
  OverlappedGradients(const OverlappedGradients&) = delete;
  OverlappedGradients& operator=(const OverlappedGradients&) = delete;

  /// Hooks the gradient holders of each job that this backward finishes, each job's tensors in
  /// the order of the forward (the buckets take them backwards). `step`: as World::sum's.
  void arm(const std::vector<std::vector<torch::Tensor>>& jobs, int64_t step);
  /// After the backward: starts the buckets still waiting (a tensor no row reached has a zero
  /// gradient), waits for all, writes the sums into the gradients and removes the hooks.
  void finish();

  /// What the last finish() saw: buckets, those started from a hook during the backward, and
  /// the gradients the backward finished after the first bucket had started (instrumentation:
  /// more than 0 means the communication overlapped the backward).
  struct Overlap {
    int64_t buckets = 0, started_in_backward = 0, grads_after_first_start = 0;
  };
  Overlap last() const { return last_; }

 private:
  struct State;
  World& world_;
  std::unique_ptr<State> state_;
  Overlap last_;
};

/// ZeRO-1 for full fine-tuning: the fp32 master weights and AdamW's moments are split over the
/// ranks, each holding one contiguous shard of the trained tensors laid end to end. A step
/// takes this rank's shard of the (already summed) gradients, clips by the norm over every
/// shard, steps the shard and all-gathers the weights into the model's tensors, so every rank
/// holds the whole model and a 1/N share of the optimizer: the step equals one process's.
struct ShardedAdamW {
  /// Shards `full`, whose params are `model`'s tensors or their fp32 masters (in `model`'s
  /// order, as new_optimizer makes them), state and step count included.
  ShardedAdamW(World& world, std::vector<torch::Tensor> model, const AdamW& full);

  /// The step on this rank's shard; the model's gradients are cleared and its tensors hold
  /// the new weights. Returns the gradients' norm before clipping (undefined without).
  torch::Tensor step(double lr, double max_grad_norm, int64_t step_number);
  /// The whole state gathered on every rank (a collective: every rank calls it): the AdamW and
  /// masters that new_optimizer would hold, for a checkpoint or the final model.
  void gather(std::optional<AdamW>& optimizer, std::optional<MasterWeights>& masters) const;

  World& world;
  std::vector<torch::Tensor> model;  // the trained tensors, as the model holds them
  int64_t shard = 0;                 // elements a rank holds
  std::optional<AdamW> local;        // over {this rank's fp32 master shard [shard]}
};

}  // namespace lorafit
