// `lorafit train`: one adapter on one frozen base, from a validated recipe to PEFT-format
// outputs, with resumable checkpoints.
#pragma once

#include <torch/torch.h>

#include <string>
#include <vector>

#include "core/llama.h"
#include "core/recipe.h"

namespace lorafit {

struct TrainRun {
  std::string recipe_path;  // for the final message
  std::string resume;       // OUTPUT or OUTPUT/checkpoints/step-N; empty for a fresh run
};

/// Trains as the recipe says and writes OUTPUT/{adapter, checkpoints, metrics.jsonl,
/// loss.svg, recipe.yaml}.
void train(const Recipe& recipe, const TrainRun& run);

/// A micro-batch on the model's device.
struct Batch {
  torch::Tensor ids;     // [B, T] int64, right-padded with 0
  torch::Tensor labels;  // [B, T] int64, -100 where nothing is learned
  int64_t tokens = 0;    // real (unpadded) tokens
};

/// Forward and backward over the micro-batches of one optimizer step, each weighted so the
/// gradient is that of the mean loss over all `targets` tokens of the step. Returns that loss
/// as a 0-dim tensor on the model's device: nothing here waits for the GPU.
torch::Tensor accumulate_gradients(LlamaForCausalLM& model,
                                   const std::vector<Batch>& micro_batches,
                                   int64_t targets);

/// HF transformers' learning rate at optimizer step `step` (0-based) of `total`: linear warmup
/// from 0, then constant, linear decay to 0, or half a cosine to 0.
double scheduled_lr(const TrainRecipe& t, int64_t step, int64_t total);

}  // namespace lorafit
