#include "core/eval.h"

#include <algorithm>
#include <numeric>

#include "core/datasets.h"
#include "core/errors.h"
#include "core/fused_ops.h"

namespace lorafit {

namespace {
// Rows of fp32 logits held at once: 2048 x 128256 x 4 bytes is about 1 GiB.
constexpr int64_t kLogitRowsPerChunk = 2048;
}  // namespace

std::vector<std::vector<int64_t>> eval_sequences(const std::vector<TextRecord>& records,
                                                 const Tokenizer& tokenizer,
                                                 int64_t bos,
                                                 int64_t max_seq_len) {
  std::vector<std::vector<int64_t>> out;
  out.reserve(records.size());
  for (const auto& r : records) {
    std::vector<int64_t> ids{bos};
    const auto body = tokenizer.encode(r.text);
    ids.insert(ids.end(), body.begin(), body.end());
    if (static_cast<int64_t>(ids.size()) > max_seq_len) ids.resize(max_seq_len);
    out.push_back(std::move(ids));
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
                    const std::vector<std::vector<int64_t>>& sequences,
                    int64_t batch_size) {
  torch::NoGradGuard no_grad;
  model->eval();
  const auto device = model->inv_freq.device();
  const auto vocab = model->config.vocab_size;

  // Longest first, so each batch pads little.
  std::vector<size_t> order(sequences.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return sequences[a].size() > sequences[b].size(); });

  double nll = 0;
  int64_t scored = 0;
  for (size_t start = 0; start < order.size(); start += batch_size) {
    const size_t end = std::min(order.size(), start + static_cast<size_t>(batch_size));
    const auto t = static_cast<int64_t>(sequences[order[start]].size());
    if (t < 2) break;  // sorted: nothing after this scores a token
    const auto b = static_cast<int64_t>(end - start);
    std::vector<int64_t> ids_host(b * t, 0);              // right-padded with token 0, never scored
    std::vector<int64_t> next_host(b * t, kIgnoreLabel);  // the token each position predicts
    for (int64_t i = 0; i < b; ++i) {
      const auto& seq = sequences[order[start + i]];
      for (size_t j = 0; j < seq.size(); ++j) {
        if (seq[j] < 0 || seq[j] >= vocab) {
          throw Error("token id " + std::to_string(seq[j]) +
                      " is outside the model's vocabulary of " + std::to_string(vocab) +
                      " (hint: the tokenizer does not belong to this model)");
        }
        ids_host[i * t + j] = seq[j];
        if (j + 1 < seq.size()) next_host[i * t + j] = seq[j + 1];
      }
    }
    auto ids = torch::from_blob(ids_host.data(), {b, t}, torch::kInt64).to(device);     // [B, T]
    auto next = torch::from_blob(next_host.data(), {b * t}, torch::kInt64).to(device);  // [B*T]
    auto hidden = model->forward(ids);                                                  // [B, T, C]
    nll -= target_log_prob_sum(model, hidden.reshape({b * t, -1}), next).item<double>();
    scored += static_cast<int64_t>(
        std::count_if(next_host.begin(), next_host.end(), [](int64_t x) { return x >= 0; }));
  }
  return {scored ? nll / scored : 0.0, scored};
}

}  // namespace lorafit
