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

  /// Sums the tensors over the ranks, in place (the same shapes on every rank): they travel as
  /// fp32 buckets of at most bucket_bytes, one collective each, all started before the first
  /// is waited for. `step` is where this rank is, for the error that names a rank that stopped.
  void sum(const std::vector<torch::Tensor>& tensors, int64_t step);

 private:
  struct Impl;
  Launch launch_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace lorafit
