#include "core/eval.h"

#include <algorithm>
#include <numeric>

#include "core/datasets.h"
#include "core/errors.h"
#include "core/fused_ops.h"
#include "core/text_data.h"

namespace lorafit {

namespace {
// Rows of fp32 logits held at once: 2048 x 128256 x 4 bytes is about 1 GiB.
constexpr int64_t kLogitRowsPerChunk = 2048;
}  // namespace

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

namespace {

// fp32 for bf16/f16/f32 heads (as transformers upcasts logits), f64 for an f64 head.
torch::Dtype softmax_dtype(const torch::Tensor& weight) {
  return c10::promoteTypes(weight.scalar_type(), torch::kFloat32);
}

// Sum over rows of log softmax(hidden W^T)[target], holding the logits of one chunk of rows at
// a time. The loss is the graph's end, so its gradient is known up to the incoming scale:
// the forward computes d/dhidden (and d/dW when the head trains) chunk by chunk right away,
// and the backward only scales them. No [N, V] logits live from forward to backward, and
// nothing is recomputed. Logits are computed in the weight's dtype and softmaxed in fp32, as
// transformers does.
struct ChunkedTargetLogProb : torch::autograd::Function<ChunkedTargetLogProb> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx,
                               torch::Tensor hidden /*[N, C]*/,
                               torch::Tensor weight /*[V, C]*/,
                               torch::Tensor targets /*[N]*/) {
    const auto acc = softmax_dtype(weight);
    const bool want_h = hidden.requires_grad(), want_w = weight.requires_grad();
    torch::Tensor grad_hidden = want_h ? torch::empty_like(hidden) : torch::Tensor();  // [N, C]
    torch::Tensor grad_weight =
        want_w ? torch::zeros_like(weight, acc) : torch::Tensor();  // [V, C]
    auto total = torch::zeros({}, torch::dtype(torch::kFloat64).device(hidden.device()));
    for (int64_t start = 0; start < hidden.size(0); start += kLogitRowsPerChunk) {
      const auto n = std::min(kLogitRowsPerChunk, hidden.size(0) - start);
      const auto h = hidden.narrow(0, start, n);  // [n, C]
      auto [logp, d] = target_log_softmax(torch::nn::functional::linear(h, weight),
                                          targets.narrow(0, start, n), want_h || want_w);
      total += logp.to(torch::kFloat64).sum();
      if (want_h) {
        auto rows = grad_hidden.narrow(0, start, n);  // [n, C]
        at::mm_out(rows, d, weight);
      }
      if (want_w) grad_weight += d.t().matmul(h).to(acc);
    }
    ctx->save_for_backward(
        {grad_hidden, want_w ? grad_weight.to(weight.scalar_type()) : grad_weight});
    return total;
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto g = grads[0];  // scalar
    // Scaled in at least fp32: g (1 / target count) is not exact in bf16.
    auto scaled = [&](const torch::Tensor& x) {
      if (!x.defined()) return x;
      const auto acc = c10::promoteTypes(x.scalar_type(), torch::kFloat32);
      return (x.to(acc) * g.to(acc)).to(x.scalar_type());
    };
    return {scaled(saved[0]), scaled(saved[1]), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor target_log_prob_sum(LlamaForCausalLM& model,
                                  const torch::Tensor& hidden,
                                  const torch::Tensor& targets) {
  // The head is never an adapter target (projections() lists the seven per layer), so its
  // weight is the whole head.
  TORCH_CHECK(!model->lm_head->adapter, "target_log_prob_sum: the head carries an adapter");
  return ChunkedTargetLogProb::apply(hidden, model->lm_head->weight, targets);
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
