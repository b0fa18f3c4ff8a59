// Held-out loss as DESIGN.md's `lorafit eval` defines it: each record is BOS + tokens (no
// EOS), cut to max_seq_len, and every position after the first is scored; the loss is the mean
// negative log-likelihood over all scored tokens.
#pragma once

#include <cmath>
#include <vector>

#include "core/llama.h"
#include "core/text_data.h"
#include "tokenizer/tokenizer.h"

namespace lorafit {

struct EvalResult {
  double loss = 0;     // mean NLL (nats) over scored tokens
  int64_t tokens = 0;  // scored tokens
  double perplexity() const { return std::exp(loss); }
};

/// BOS + encode(text), cut to max_seq_len tokens, for each record.
std::vector<std::vector<int64_t>> eval_sequences(const std::vector<TextRecord>& records,
                                                 const Tokenizer& tokenizer,
                                                 int64_t bos,
                                                 int64_t max_seq_len);

/// Scores the sequences in batches of `batch_size` (right-padded; causal attention keeps the
/// padding from reaching real tokens).
EvalResult evaluate(LlamaForCausalLM& model,
                    const std::vector<std::vector<int64_t>>& sequences,
                    int64_t batch_size);

/// Sum of log p(targets[i] | hidden[i]) over rows, computing the head's logits a chunk of rows
/// at a time so fp32 logits never exist for all rows at once; differentiable with respect to
/// hidden (its gradient is computed in the same pass). Rows whose target is negative
/// (kIgnoreLabel) add nothing and get a zero gradient, so callers never select rows (a
/// boolean index would wait for the GPU).
/// hidden: [N, C], targets: [N] -> f64 scalar.
torch::Tensor target_log_prob_sum(LlamaForCausalLM& model,
                                  const torch::Tensor& hidden,
                                  const torch::Tensor& targets);

}  // namespace lorafit
