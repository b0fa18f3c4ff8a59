// `lorafit train`: one adapter on one frozen base, from a validated recipe to PEFT-format
// outputs, with resumable checkpoints.
#pragma once

#include <string>

#include "core/recipe.h"

namespace lorafit {

struct TrainRun {
  std::string recipe_path;  // for the final message
  std::string resume;       // OUTPUT or OUTPUT/checkpoints/step-N; empty for a fresh run
};

/// Trains as the recipe says and writes OUTPUT/{adapter, checkpoints, metrics.jsonl,
/// loss.svg, recipe.yaml}.
void train(const Recipe& recipe, const TrainRun& run);

/// HF transformers' learning rate at optimizer step `step` (0-based) of `total`: linear warmup
/// from 0, then constant, linear decay to 0, or half a cosine to 0.
double scheduled_lr(const TrainRecipe& t, int64_t step, int64_t total);

}  // namespace lorafit
