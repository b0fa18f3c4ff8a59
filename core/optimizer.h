// AdamW over the trainable tensors, stepped with multi-tensor kernels: each operation is one
// launch over every tensor (LibTorch's torch::optim::AdamW launches about ten kernels per
// tensor: 4,500 per step for LoRA on a 7B model), on a GPU two kernels for the whole step
// (core/fused_ops.h), and gradient clipping never waits for the GPU; and the learning-rate
// schedule it steps with.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "core/recipe.h"

namespace lorafit {

struct AdamWSettings {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;  // decoupled: each step multiplies the weights by 1 - lr * wd
};

struct AdamW {
  AdamW(std::vector<torch::Tensor> params, AdamWSettings settings);

  /// Clips the gradients' global L2 norm to `max_grad_norm` (0: no clipping), takes one AdamW
  /// step at `lr` (PyTorch's update, bias-corrected) and clears the gradients. Returns the
  /// norm before clipping as a 0-dim tensor on the parameters' device (undefined without
  /// clipping): reading it waits for the GPU, so callers read it only when they log it.
  /// `sum_over_ranks` (sharded state): sums the squared norm of these gradients with the other
  /// ranks' shards', for the norm of all of them.
  torch::Tensor step(double lr,
                     double max_grad_norm,
                     const std::function<torch::Tensor(torch::Tensor)>& sum_over_ranks = nullptr);

  /// The state as tensors (exp_avg.i, exp_avg_sq.i in parameter order) plus the step count;
  /// `load` checks that count and the shapes against this optimizer's parameters.
  void save(const std::string& path) const;
  void load(const std::string& path);

  std::vector<torch::Tensor> params;      // the trainable tensors, fp32
  std::vector<torch::Tensor> exp_avg;     // first moments, shaped as params
  std::vector<torch::Tensor> exp_avg_sq;  // second moments, shaped as params
  int64_t steps = 0;                      // updates taken (the bias correction's t)
  AdamWSettings settings;
};

/// fp32 master copies of trained weights held in a lower precision (full fine-tuning with a bf16
/// model): the optimizer updates the masters, the model computes with their casts. Gradients
/// accumulate in the model's dtype over a step's micro-batches and are taken in fp32 once.
struct MasterWeights {
  explicit MasterWeights(std::vector<torch::Tensor> model_params);

  /// masters[i].grad = model[i].grad in fp32; the model's gradients are cleared.
  void take_grads();
  /// model[i] = masters[i], cast to the model's dtype.
  void publish();

  std::vector<torch::Tensor> model;    // the model's trained tensors, bf16 or f16
  std::vector<torch::Tensor> masters;  // fp32, shaped as model
};

/// The tensors whose gradients the backward fills for `optimizer`: its parameters, each master
/// replaced by the model tensor it masters.
std::vector<torch::Tensor> gradient_tensors(const AdamW& optimizer,
                                            const std::optional<MasterWeights>& masters);

/// Masters for the trainable tensors not in fp32, put in their place in `params` (what the
/// optimizer then updates); nullopt when every tensor is fp32 already.
std::optional<MasterWeights> masters_for(std::vector<torch::Tensor>& params);

/// The warmup of a run of `total` steps: train.warmup_steps, or ceil(warmup_ratio x total).
int64_t warmup_steps(const TrainRecipe& t, int64_t total);

/// HF transformers' learning rate at optimizer step `step` (0-based) of `total`: linear warmup
/// from 0, then constant, linear decay to 0, or half a cosine to 0.
double scheduled_lr(const TrainRecipe& t, int64_t step, int64_t total);

}  // namespace lorafit
