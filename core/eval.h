// Held-out loss as DESIGN.md's `lorafit eval` defines it: each record is BOS + tokens (no
// EOS), cut to max_seq_len, and every position after the first is scored; the loss is the mean
// negative log-likelihood over all scored tokens.
#pragma once

#include <cmath>
#include <vector>

#include "core/datasets.h"
#include "core/llama.h"
#include "tokenizer/tokenizer.h"

namespace lorafit {

struct EvalResult {
  double loss = 0;     // mean NLL (nats) over scored tokens
  int64_t tokens = 0;  // scored tokens
  int64_t records = 0;
  // Records whose every scored token is the model's most likely next token: greedy decoding
  // from the unscored prefix reproduces them exactly (exact-match accuracy).
  int64_t exact = 0;
  double perplexity() const { return std::exp(loss); }
  double accuracy() const { return records ? static_cast<double>(exact) / records : 0.0; }
};

/// What `lorafit eval` scores in each record of a dataset file. `text`: BOS + encode(text), no
/// EOS, every position after the first (DESIGN.md); alpaca, chat and tokens: the sequence and
/// labels training builds (only responses and their EOS scored), one record per example.
/// Either way cut to max_seq_len tokens. `chat_template` as data.chat_template.
std::vector<Example> eval_examples(const std::string& path,
                                   const Tokenizer& tokenizer,
                                   const std::string& format,
                                   const LlamaConfig& config,
                                   int64_t max_seq_len,
                                   const std::string& chat_template = "model");

/// Scores the examples in batches of `batch_size` rows (right-padded; causal attention keeps
/// the padding from reaching real tokens): position t predicts labels[t + 1]. With `packing`
/// the records share rows as long as the longest record, each attending to itself only: the
/// same figures from fewer, fuller rows.
EvalResult evaluate(LlamaForCausalLM& model,
                    const std::vector<Example>& examples,
                    int64_t batch_size,
                    bool packing = false);

}  // namespace lorafit
