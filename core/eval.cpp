#include "core/eval.h"

#include <algorithm>
#include <numeric>

#include "core/datasets.h"
#include "core/errors.h"
#include "core/loss.h"
#include "core/text_data.h"

namespace lorafit {

std::vector<Example> eval_examples(const std::string& path,
                                   const Tokenizer& tokenizer,
                                   const std::string& format,
                                   const LlamaConfig& config,
                                   int64_t max_seq_len,
                                   const std::string& chat_template) {
  const auto options =
      dataset_options(tokenizer, config, format, max_seq_len, false, chat_template);
  if (format != "text") return load_examples(path, tokenizer, options);
  std::vector<Example> out;
  for (const auto& r : read_text_records(path)) {
    // As transformers' tokenizer(text): with the tokenizer's special prefix, no EOS.
    auto ids = tokenizer.encode(r.text, /*add_special_tokens=*/true);
    if (static_cast<int64_t>(ids.size()) > max_seq_len) ids.resize(max_seq_len);
    if (!ids.empty()) out.push_back({ids, ids});
  }
  return out;
}

EvalResult evaluate(LlamaForCausalLM& model,
                    const std::vector<Example>& examples,
                    int64_t batch_size) {
  torch::NoGradGuard no_grad;
  model->eval();
  const auto device = model->inv_freq.device();
  const auto vocab = model->config.vocab_size;

  // Longest first, so each batch pads little.
  std::vector<size_t> order(examples.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return examples[a].input_ids.size() > examples[b].input_ids.size();
  });

  EvalResult result;
  double nll = 0;
  for (size_t start = 0; start < order.size(); start += batch_size) {
    const size_t end = std::min(order.size(), start + static_cast<size_t>(batch_size));
    const auto t = static_cast<int64_t>(examples[order[start]].input_ids.size());
    const auto b = static_cast<int64_t>(end - start);
    std::vector<int64_t> ids_host(b * t, 0);              // right-padded with token 0, never scored
    std::vector<int64_t> next_host(b * t, kIgnoreLabel);  // the token each position predicts
    std::vector<uint8_t> scored_rows(b, 0);
    for (int64_t i = 0; i < b; ++i) {
      const auto& ex = examples[order[start + i]];
      for (size_t j = 0; j < ex.input_ids.size(); ++j) {
        const auto id = ex.input_ids[j];
        if (id < 0 || id >= vocab) {
          throw Error("token id " + std::to_string(id) + " is outside the model's vocabulary of " +
                      std::to_string(vocab) +
                      " (hint: the tokenizer does not belong to this model)");
        }
        ids_host[i * t + j] = id;
        if (j + 1 < ex.input_ids.size() && ex.labels[j + 1] != kIgnoreLabel) {
          next_host[i * t + j] = ex.labels[j + 1];
          scored_rows[i] = 1;
          ++result.tokens;
        }
      }
    }
    // A record with nothing to score (empty, or cut before its response) counts nowhere.
    result.records += std::count(scored_rows.begin(), scored_rows.end(), 1);
    if (t < 2) continue;
    auto ids = torch::from_blob(ids_host.data(), {b, t}, torch::kInt64).to(device);     // [B, T]
    auto next = torch::from_blob(next_host.data(), {b * t}, torch::kInt64).to(device);  // [B*T]
    auto hidden = model->forward(ids).reshape({b * t, -1});                             // [B*T, C]
    nll -= target_log_prob_sum(model, hidden, next).item<double>();
    // Exact match: no scored position whose most likely token is another.
    auto miss = torch::zeros({b * t}, torch::dtype(torch::kBool).device(device));  // [B*T]
    for (int64_t row = 0; row < b * t; row += kLogitRowsPerChunk) {
      const auto n = std::min(kLogitRowsPerChunk, b * t - row);
      const auto target = next.narrow(0, row, n);
      miss.narrow(0, row, n).copy_(model->logits(hidden.narrow(0, row, n)).argmax(-1).ne(target) &
                                   target.ge(0));
    }
    const auto missed = miss.view({b, t}).any(1).to(torch::kCPU);  // [B]
    for (int64_t i = 0; i < b; ++i)
      result.exact += scored_rows[i] && !missed[i].item<bool>() ? 1 : 0;
  }
  result.loss = result.tokens ? nll / static_cast<double>(result.tokens) : 0.0;
  return result;
}

}  // namespace lorafit
