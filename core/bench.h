// `lorafit bench`: the speed and memory of training steps (forward, backward, optimizer) on a
// built-in shape with random weights or on a checkpoint.
#pragma once

#include <string>
#include <vector>

namespace lorafit {

struct BenchOptions {
  std::string shape;  // a built-in shape, or empty with `model`
  std::string model;  // a Hugging Face folder
  // A dataset whose rows the steps train, read as the recipe's data.* keys say (format,
  // max_seq_len, packing); without `model`, pre-tokenized (format tokens). Empty: random ids,
  // `seq` tokens a row.
  std::string data;
  int64_t seq = 2048;
  // Sequences per step, of each job: one forward pass, as peers' benchmarks run a batch, unless
  // the overrides set train.micro_batch_size (then in micro-batches of that many).
  int64_t batch = 1;
  int64_t jobs = 1;  // fused jobs (ASPEN), each with its own adapter, rows and optimizer
  std::vector<std::string> overrides;  // recipe keys: adapter.*, train.gradient_checkpointing, ...
  std::string device = "auto";
  int64_t warmup_steps = 3;
  int64_t steps = 10;
  std::string profile;  // a Chrome trace of the timed steps is written here when set
};

struct BenchResult {
  double tokens_per_s = 0;  // real (not padding) tokens
  double padding = 0;       // the share of the rows' tokens that were padding
  double graphed = 0;       // train.cuda_graphs: the share of the timed passes replayed
  double step_ms = 0;
  double peak_mem_gib = 0;
  double peak_reserved_gib = 0;  // what the CUDA caching allocator held (0 on the CPU)
  double mfu = 0;                // model FLOPs per second over the GPU's bf16 peak; 0 on the CPU
  double loss = 0;               // of the last step, to show the run is sane
  int64_t trainable_params = 0;
  int64_t micro_batch = 0;  // each job's rows in one forward pass
  std::string device;
};

BenchResult run_bench(const BenchOptions& options);

}  // namespace lorafit
