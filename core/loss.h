// The loss head and the training loss: the summed log-likelihood of target tokens through the
// model's head, computed a chunk of rows at a time, and each micro-batch's share of its step's
// token-mean loss plus a strategy's own term.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <vector>

#include "core/batching.h"
#include "core/llama.h"

namespace lorafit {

/// Rows of fp32 logits held at once: 2048 x 128256 x 4 bytes is about 1 GiB.
constexpr int64_t kLogitRowsPerChunk = 2048;

/// Sum of log p(targets[i] | hidden[i]) over rows, computing the head's logits a chunk of rows
/// at a time so fp32 logits never exist for all rows at once; differentiable with respect to
/// hidden (its gradient is computed in the same pass). Rows whose target is negative
/// (kIgnoreLabel) add nothing and get a zero gradient, so callers never select rows (a
/// boolean index would wait for the GPU).
/// hidden: [N, C], targets: [N] -> f64 scalar.
torch::Tensor target_log_prob_sum(LlamaForCausalLM& model,
                                  const torch::Tensor& hidden,
                                  const torch::Tensor& targets);

/// What each position is scored on: the next position's label, and nothing (kIgnoreLabel) at
/// the last. labels: [B, T] -> [B, T]
torch::Tensor next_targets(const torch::Tensor& labels);

/// One forward pass over the batch; the summed negative log-likelihood of the targets of each
/// run of `rows` consecutive rows (position t predicts label t+1). -> one f64 scalar per run
std::vector<torch::Tensor> nll_sums(LlamaForCausalLM& model,
                                    const Batch& batch,
                                    const std::vector<int64_t>& rows);

/// nll_sums over the whole batch as one run.
torch::Tensor nll_sum(LlamaForCausalLM& model, const Batch& batch);

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

/// A micro-batch's part of its step's loss, to back-propagate: its summed NLL over the step's
/// `targets` (so the gradient is that of the mean over every target token of the step, not a
/// mean of micro-batch means) plus the strategy's own term times `aux_scale` (keep: [N] bool,
/// the real tokens, or undefined). Both parts are added, detached, to `step`.
torch::Tensor micro_batch_loss(const torch::Tensor& nll,
                               int64_t targets,
                               const AuxLoss& aux,
                               const torch::Tensor& keep,
                               double aux_scale,
                               StepLoss& step);

}  // namespace lorafit
