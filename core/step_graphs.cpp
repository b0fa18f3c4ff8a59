#include "core/step_graphs.h"

#include <fmt/core.h>

#include "core/errors.h"
#include "core/loss.h"

namespace lorafit {

void StepGraphs::check(torch::Device device, int64_t world_size) {
  if (!device.is_cuda()) {
    throw ConfigError("'train.cuda_graphs' needs a CUDA device; this run trains on " +
                      device.str() + " (hint: drop cuda_graphs, or set device: cuda)");
  }
  if (world_size > 1) {
    throw ConfigError(
        "'train.cuda_graphs' with data parallelism: the gradients' all-reduce starts from hooks "
        "in the backward, which a replayed graph does not run (hint: drop cuda_graphs under "
        "torchrun)");
  }
}

StepGraphs::StepGraphs(torch::Device device, std::vector<torch::Tensor> trainable)
    : graphs_(device), trainable_(std::move(trainable)) {}

void StepGraphs::forward_backward(LlamaForCausalLM& model,
                                  const Batch& batch,
                                  const std::vector<JobRows::Span>& spans,
                                  const std::vector<StepPart>& parts) {
  ++passes_;
  bool graphable = !batch.segments.defined();
  for (const auto& p : parts) graphable = graphable && !(p.aux && *p.aux);
  Key key{batch.ids.sizes().vec(), batch.tokens < batch.ids.numel(), {}};
  for (const auto& s : spans) std::get<2>(key).emplace_back(s.job, s.rows);
  auto it = layouts_.find(key);
  if (graphable && it == layouts_.end() && layouts_.size() < kMaxGraphs)
    it = layouts_.emplace(key, Layout{}).first;
  if (!graphable || it == layouts_.end()) return lorafit::forward_backward(model, batch, parts);
  auto& l = it->second;
  if (l.seen++ == 0) return eager_finding_reached(l, model, batch, parts);
  if (!l.graph) capture(l, model, batch, parts);
  replay(l, batch, parts);
  ++replayed_;
}

void StepGraphs::eager_finding_reached(Layout& l,
                                       LlamaForCausalLM& model,
                                       const Batch& batch,
                                       const std::vector<StepPart>& parts) {
  // A gradient the pass reached is new, another tensor, or added to in place (a new version).
  struct Grad {
    const void* impl = nullptr;
    int64_t version = 0;
  };
  std::vector<Grad> before;
  for (const auto& t : trainable_) {
    const auto& g = t.grad();
    before.push_back(g.defined() ? Grad{g.unsafeGetTensorImpl(), g._version()} : Grad{});
  }
  // On the stream the capture uses, so that its library workspaces and per-shape plans (and
  // the adapters' constants) exist before it.
  graphs_.run([&] { lorafit::forward_backward(model, batch, parts); });
  for (size_t i = 0; i < trainable_.size(); ++i) {
    const auto& g = trainable_[i].grad();
    if (g.defined() &&
        (before[i].impl != g.unsafeGetTensorImpl() || before[i].version != g._version()))
      l.reached.push_back(i);
  }
}

void StepGraphs::capture(Layout& l,
                         LlamaForCausalLM& model,
                         const Batch& batch,
                         const std::vector<StepPart>& parts) {
  l.inputs.ids = torch::empty_like(batch.ids);
  l.inputs.labels = torch::empty_like(batch.labels);
  if (batch.keep.defined()) l.inputs.keep = torch::empty_like(batch.keep);
  l.inputs.tokens = batch.tokens;
  l.reciprocals =
      torch::ones({static_cast<int64_t>(parts.size())}, batch.ids.options().dtype(torch::kFloat64));
  // The graph adds to the gradients that exist when it is captured, in place (autograd
  // accumulates so), and so to these very tensors in every replay.
  l.grads.clear();
  for (const auto i : l.reached) {
    auto& t = trainable_[i];
    if (!t.grad().defined()) t.mutable_grad() = torch::zeros_like(t);
    l.grads.push_back(t.grad());
  }
  std::vector<int64_t> rows;
  for (const auto& p : parts) rows.push_back(p.rows);
  l.losses.assign(parts.size(), torch::Tensor());
  try {
    l.graph = graphs_.capture([&] {
      const auto nll = nll_sums(model, l.inputs, rows);
      torch::Tensor total;
      for (size_t i = 0; i < nll.size(); ++i) {
        // As micro_batch_loss, which divides by the count: a division by a host number is a
        // multiplication by its reciprocal on the GPU, and this gives the same bits.
        const auto loss = nll[i] * l.reciprocals[static_cast<int64_t>(i)];
        l.losses[i] = loss.detach();
        total = total.defined() ? total + loss : loss;
      }
      total.backward();
    });
  } catch (const std::exception& e) {
    throw Error(fmt::format(
        "train.cuda_graphs: capturing the forward-backward pass of a {}x{} batch failed: {} "
        "(hint: set train.cuda_graphs: false)",
        batch.ids.size(0), batch.ids.size(1), e.what()));
  }
}

void StepGraphs::replay(Layout& l, const Batch& batch, const std::vector<StepPart>& parts) {
  const torch::NoGradGuard no_grad;
  l.inputs.ids.copy_(batch.ids);
  l.inputs.labels.copy_(batch.labels);
  if (l.inputs.keep.defined()) l.inputs.keep.copy_(batch.keep);
  std::vector<double> values;
  for (const auto& p : parts)
    values.push_back(1.0 / static_cast<double>(std::max<int64_t>(1, p.targets)));
  // Pinned, so that the copy does not wait for the stream; a fresh buffer each time (the
  // host allocator keeps it until the copy has run).
  l.reciprocals.copy_(torch::tensor(values, torch::kFloat64).pin_memory(), /*non_blocking=*/true);
  // Each gradient the graph adds to is the tensor's own: a step's first pass finds none (the
  // optimizer cleared it), and an eager pass of another layout may have made another.
  std::vector<torch::Tensor> cleared;
  for (size_t k = 0; k < l.reached.size(); ++k) {
    auto& t = trainable_[l.reached[k]];
    const auto& g = t.grad();
    if (!g.defined()) {
      cleared.push_back(l.grads[k]);
    } else if (!g.is_same(l.grads[k])) {
      l.grads[k].copy_(g);
    }
    t.mutable_grad() = l.grads[k];
  }
  if (!cleared.empty()) at::_foreach_zero_(cleared);
  graphs_.replay(*l.graph);
  for (size_t i = 0; i < parts.size(); ++i) {
    auto& sum = parts[i].loss->nll;
    sum = sum.defined() ? sum + l.losses[i] : l.losses[i].clone();
  }
}

}  // namespace lorafit
