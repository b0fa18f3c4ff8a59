// `lorafit train`: the adapter of each job of a recipe (one, or a `jobs:` list) on one shared
// frozen base, in one process or over data-parallel ranks, from a validated recipe to
// PEFT-format outputs, with resumable checkpoints.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <string>
#include <vector>

#include "core/batching.h"
#include "core/llama.h"
#include "core/loss.h"
#include "core/optimizer.h"
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

/// What every batch's length must be a multiple of: with S2-Attn, 2 / group_ratio (its groups
/// and half-groups must split it); else 1.
size_t batch_length_multiple(const LongLoraRecipe& longlora);

/// Sets the model's layers up as the recipe trains them: activation checkpointing and what it
/// keeps (train.gradient_checkpointing, train.checkpoint_keep), and S2-Attn (a longlora block).
void use_recipe_layers(LlamaForCausalLM& model, const Recipe& recipe);

/// One job's rows in a batch, as the training step weighs them.
struct StepPart {
  int64_t rows = 0;              // consecutive batch rows, after the previous part's
  int64_t targets = 0;           // target tokens of the job's whole optimizer step
  const AuxLoss* aux = nullptr;  // the job's strategy term, if any
  double aux_scale = 1.0;        // the micro-batch's share of the step
  StepLoss* loss = nullptr;      // where the micro-batch's losses add up
};

/// The training step's forward, loss and backward over one batch whose consecutive rows are
/// `parts` (several jobs' micro-batches fused, or one): one forward pass, each part's
/// micro_batch_loss, one backward. `lorafit train` and `lorafit bench` both step with it.
void forward_backward(LlamaForCausalLM& model,
                      const Batch& batch,
                      const std::vector<StepPart>& parts);

/// The training step's update once the gradients are complete (summed over ranks): fp32
/// masters take the gradients, AdamW clips them to `max_grad_norm` (0: no clipping) and steps,
/// the model gets the new weights. -> the gradient norm [] (undefined without clipping)
torch::Tensor apply_update(AdamW& optimizer,
                           std::optional<MasterWeights>& masters,
                           double lr,
                           double max_grad_norm);

/// Forward and backward over the micro-batches of one optimizer step, each weighted so the
/// gradient is that of the mean loss over all `targets` tokens of the step, plus `aux` (if
/// any) averaged over the micro-batches, as MoE-PEFT adds its router loss. Nothing here
/// waits for the GPU.
StepLoss accumulate_gradients(LlamaForCausalLM& model,
                              const std::vector<Batch>& micro_batches,
                              int64_t targets,
                              const AuxLoss& aux = {});

}  // namespace lorafit
