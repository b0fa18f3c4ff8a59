#include "core/eval.h"

#include <algorithm>
#include <numeric>

#include "core/batching.h"
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
      dataset_options(tokenizer, config, format, max_seq_len, Packing::Pad, chat_template);
  if (format != "text") return load_examples(path, tokenizer, options);
  std::vector<Example> out;
  for (const auto& r : read_text_records(path)) {
    // As transformers' tokenizer(text): with the tokenizer's special prefix, no EOS.
    auto ids = tokenizer.encode(r.text, /*add_special_tokens=*/true);
    if (static_cast<int64_t>(ids.size()) > max_seq_len) ids.resize(max_seq_len);
    if (!ids.empty()) out.push_back({ids, ids, {}});
  }
  return out;
}

EvalResult evaluate(LlamaForCausalLM& model,
                    const std::vector<Example>& examples,
                    int64_t batch_size,
                    bool packing) {
  torch::NoGradGuard no_grad;
  model->eval();
  const auto device = model->inv_freq.device();
  const auto vocab = model->config.vocab_size;
  size_t longest = 0;
  for (const auto& ex : examples) {
    for (const auto id : ex.input_ids) {
      if (id < 0 || id >= vocab) {
        throw Error("token id " + std::to_string(id) + " is outside the model's vocabulary of " +
                    std::to_string(vocab) + " (hint: the tokenizer does not belong to this model)");
      }
    }
    longest = std::max(longest, ex.input_ids.size());
  }
  // Packed, the records fill rows as long as the longest; a record's first label is never
  // scored, so packing changes nothing that counts.
  const auto rows = packing ? pack_records(examples, static_cast<int64_t>(longest)) : examples;
  // Longest first, so each batch pads little.
  std::vector<size_t> order(rows.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return rows[a].input_ids.size() > rows[b].input_ids.size();
  });

  EvalResult result;
  double nll = 0;
  for (size_t start = 0; start < order.size(); start += batch_size) {
    const size_t end = std::min(order.size(), start + static_cast<size_t>(batch_size));
    const BatchPart part{&rows, {order.begin() + start, order.begin() + end}, 0};
    const auto batch = collate({part}, device);
    const auto b = batch.ids.size(0), t = batch.ids.size(1);
    if (t < 2) continue;
    // The token each position predicts: the next label, never across records (their first
    // labels are ignored) [B*T]
    const auto next = next_targets(batch.labels).reshape({-1});
    auto hidden = model->forward(batch.ids, nullptr, {}, batch.segments).reshape({b * t, -1});
    nll -= target_log_prob_sum(model, hidden, next).item<double>();
    // Exact match: no scored position of a record whose most likely token is another.
    auto miss = torch::zeros({b * t}, torch::dtype(torch::kBool).device(device));  // [B*T]
    for (int64_t row = 0; row < b * t; row += kLogitRowsPerChunk) {
      const auto n = std::min(kLogitRowsPerChunk, b * t - row);
      const auto target = next.narrow(0, row, n);
      miss.narrow(0, row, n).copy_(model->logits(hidden.narrow(0, row, n)).argmax(-1).ne(target) &
                                   target.ge(0));
    }
    // Each token's record: its segment in packed rows, else its row. [B*T]
    const auto record =
        batch.segments.defined()
            ? batch.segments.ids.reshape({-1})
            : torch::arange(b, torch::dtype(torch::kInt64).device(device)).repeat_interleave(t);
    const auto records = batch.segments.defined() ? batch.segments.cu_seqlens.size(0) - 1 : b;
    auto count = [&](const torch::Tensor& per_token) {  // [B*T] bool -> per record [R] int64
      return torch::zeros({records}, torch::dtype(torch::kInt64).device(device))
          .index_add_(0, record, per_token.to(torch::kInt64))
          .to(torch::kCPU);
    };
    const auto scored = count(next.ge(0)), missed = count(miss);
    result.tokens += scored.sum().item<int64_t>();
    // A record with nothing to score (empty, or cut before its response) counts nowhere.
    result.records += scored.gt(0).sum().item<int64_t>();
    result.exact += (scored.gt(0) & missed.eq(0)).sum().item<int64_t>();
  }
  result.loss = result.tokens ? nll / static_cast<double>(result.tokens) : 0.0;
  return result;
}

}  // namespace lorafit
