#include "core/generate.h"

#include <algorithm>

namespace lorafit {

int64_t pick_token(const torch::Tensor& logits, const GenerateOptions& o, torch::Generator& gen) {
  auto l = logits.to(torch::kFloat32);
  if (o.temperature <= 0) return l.argmax().item<int64_t>();
  auto probs = torch::softmax(l / o.temperature, -1);  // [V]
  if (o.top_p < 1.0) {
    auto sorted = probs.sort(/*dim=*/-1, /*descending=*/true);
    auto p = std::get<0>(sorted), idx = std::get<1>(sorted);
    // Drop a token when the tokens ranked above it already reach top_p (the first always stays).
    auto drop = (p.cumsum(-1) - p) >= o.top_p;
    probs = torch::zeros_like(probs).scatter(0, idx, p.masked_fill(drop, 0.0));
  }
  return torch::multinomial(probs, 1, /*replacement=*/false, gen).item<int64_t>();
}

std::vector<int64_t> generate(LlamaForCausalLM& model,
                              const std::vector<int64_t>& prompt,
                              const GenerateOptions& o) {
  torch::NoGradGuard no_grad;
  model->eval();
  const auto device = model->inv_freq.device();
  const auto& eos = model->config.eos_token_ids;
  auto gen = torch::make_generator<at::CPUGeneratorImpl>(o.seed);
  KVCache cache;
  auto ids = torch::tensor(prompt, torch::kInt64).unsqueeze(0).to(device);  // [1, T]
  std::vector<int64_t> out;
  while (static_cast<int64_t>(out.size()) < o.max_new_tokens) {
    auto hidden = model->forward(ids, &cache);  // [1, T, C]
    auto logits = model->logits(hidden.select(1, hidden.size(1) - 1))[0].to(torch::kCPU);  // [V]
    const int64_t next = pick_token(logits, o, gen);
    if (std::find(eos.begin(), eos.end(), next) != eos.end()) break;
    out.push_back(next);
    ids = torch::full({1, 1}, next, torch::dtype(torch::kInt64).device(device));
  }
  return out;
}

}  // namespace lorafit
