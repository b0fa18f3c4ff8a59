#include "core/loss.h"

#include "core/datasets.h"
#include "core/fused_ops.h"

namespace lorafit {

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

torch::Tensor next_targets(const torch::Tensor& labels) {
  return torch::cat({labels.narrow(1, 1, labels.size(1) - 1),
                     torch::full({labels.size(0), 1}, kIgnoreLabel, labels.options())},
                    1);
}

std::vector<torch::Tensor> nll_sums(LlamaForCausalLM& model,
                                    const Batch& batch,
                                    const std::vector<int64_t>& rows) {
  const bool padded = batch.tokens < batch.ids.numel();
  auto hidden = model->forward(batch.ids, nullptr, padded ? batch.keep : torch::Tensor(),
                               batch.segments);  // [B, T, C]
  const auto t = hidden.size(1);
  std::vector<torch::Tensor> out;
  int64_t row = 0;
  for (const auto n : rows) {
    // Ignored targets are skipped inside the loss.
    const auto targets = next_targets(batch.labels.narrow(0, row, n));  // [n, T]
    out.push_back(-target_log_prob_sum(model, hidden.narrow(0, row, n).reshape({n * t, -1}),
                                       targets.reshape({-1})));
    row += n;
  }
  return out;
}

torch::Tensor nll_sum(LlamaForCausalLM& model, const Batch& batch) {
  return nll_sums(model, batch, {batch.ids.size(0)})[0];
}

torch::Tensor micro_batch_loss(const torch::Tensor& nll,
                               int64_t targets,
                               const AuxLoss& aux,
                               const torch::Tensor& keep,
                               double aux_scale,
                               StepLoss& step) {
  auto add = [](torch::Tensor& sum, const torch::Tensor& x) {
    sum = sum.defined() ? sum + x.detach() : x.detach();
  };
  auto loss = nll / static_cast<double>(std::max<int64_t>(1, targets));
  add(step.nll, loss);
  if (aux) {
    const auto share = aux(keep, aux_scale);
    if (share.defined()) {
      add(step.aux, share);
      loss = loss + share;
    }
  }
  return loss;
}

}  // namespace lorafit
