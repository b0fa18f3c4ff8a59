// `lorafit train`: the adapter of each job of a recipe (one, or a `jobs:` list) on one shared
// frozen base, in one process or over data-parallel ranks, from a validated recipe to
// PEFT-format outputs, with resumable checkpoints.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <string>
#include <vector>

#include "core/llama.h"
#include "core/recipe.h"

namespace lorafit {

struct TrainRun {
  std::string recipe_path;  // for the messages that say how to go on
  std::string resume;       // OUTPUT or OUTPUT/checkpoints/step-N; empty for a fresh run
  bool overwrite = false;   // replace whatever the output folders hold
};

/// Trains as the recipe says and writes, for each job, OUTPUT/{adapter, checkpoints,
/// metrics.jsonl, loss.svg, recipe.yaml, job_state.json} (with `jobs:`, each under the job's
/// own output); full fine-tuning writes OUTPUT/model (a Hugging Face checkpoint in the base's
/// dtype) instead of OUTPUT/adapter, training fp32 masters of a bf16 or f16 model. Under
/// torchrun (WORLD_SIZE > 1) each rank trains its share of every batch and rank 0 writes.
/// Each output folder holds one run: a fresh run needs an empty one, and rank 0 locks it for
/// as long as it trains. A resume goes on from the newest checkpoint, up to the recipe's steps
/// (a checkpoint at or past them just writes the outputs), and refuses a recipe that differs
/// in a key that resume_changeable_keys() leaves out. SIGINT or SIGTERM stops every job after
/// its step in progress, with a checkpoint, and throws Interrupted.
void train(const Recipe& recipe, const TrainRun& run);

/// What `lorafit validate` says of a recipe's data, read and tokenized exactly as train reads
/// it: a line per dataset and job (records, tokens, sequences, steps); warnings (such as a
/// warmup as long as the run) go to `warnings`. A bad or empty dataset throws IoError.
std::vector<std::string> describe_data(const Recipe& recipe, std::vector<std::string>& warnings);

/// Turns on a recipe's S2-Attn (longlora block) in the model's layers; nothing without one.
void use_longlora_attention(LlamaForCausalLM& model, const LongLoraRecipe& longlora);

/// A micro-batch on the model's device.
struct Batch {
  torch::Tensor ids;     // [B, T] int64, right-padded with 0
  torch::Tensor labels;  // [B, T] int64, -100 where nothing is learned
  int64_t tokens = 0;    // real (unpadded) tokens
  torch::Tensor keep;    // [B, T] bool, the real tokens; undefined: no padding
};

/// A strategy's own loss term for the last forward pass, times `scale` (see
/// AdapterSpec::aux_loss), given the real tokens ([N] bool, or undefined for all); empty when
/// the strategy has none.
using AuxLoss = std::function<torch::Tensor(const torch::Tensor& keep, double scale)>;

/// One step's losses as 0-dim tensors on the model's device: the token-mean NLL, and the
/// strategy's term averaged over the micro-batches (undefined without one).
struct StepLoss {
  torch::Tensor nll;
  torch::Tensor aux;
};

/// Forward and backward over the micro-batches of one optimizer step, each weighted so the
/// gradient is that of the mean loss over all `targets` tokens of the step, plus `aux` (if
/// any) averaged over the micro-batches, as MoE-PEFT adds its router loss. Nothing here
/// waits for the GPU.
StepLoss accumulate_gradients(LlamaForCausalLM& model,
                              const std::vector<Batch>& micro_batches,
                              int64_t targets,
                              const AuxLoss& aux = {});

/// The warmup of a run of `total` steps: train.warmup_steps, or ceil(warmup_ratio x total).
int64_t warmup_steps(const TrainRecipe& t, int64_t total);

/// HF transformers' learning rate at optimizer step `step` (0-based) of `total`: linear warmup
/// from 0, then constant, linear decay to 0, or half a cosine to 0.
double scheduled_lr(const TrainRecipe& t, int64_t step, int64_t total);

}  // namespace lorafit
