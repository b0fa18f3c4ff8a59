// Text continuation with a KV cache: greedy (temperature 0) or sampled with temperature and
// nucleus (top-p) filtering, stopping at an EOS token or after max_new_tokens.
#pragma once

#include <cstdint>
#include <vector>

#include "core/llama.h"

namespace lorafit {

struct GenerateOptions {
  int64_t max_new_tokens = 128;
  double temperature = 0.0;  // 0: greedy
  double top_p = 1.0;
  uint64_t seed = 0;
};

/// New token ids after `prompt` (which includes BOS).
std::vector<int64_t> generate(LlamaForCausalLM& model,
                              const std::vector<int64_t>& prompt,
                              const GenerateOptions& options);

/// The token to emit from next-token logits [V]: argmax at temperature 0, else a sample from
/// softmax(logits / temperature) restricted to the smallest set of tokens whose probability
/// reaches top_p.
int64_t pick_token(const torch::Tensor& logits,
                   const GenerateOptions& options,
                   torch::Generator& gen);

}  // namespace lorafit
