// train.cuda_graphs: the training step's forward-backward passes captured as CUDA graphs and
// replayed. A pass launches thousands of small kernels (fused jobs' adapters, norms, RoPE),
// and at short rows the GPU waits for the host between them; a replay queues them all at once.
#pragma once

#include <torch/torch.h>

#include <map>
#include <optional>
#include <tuple>
#include <vector>

#include "adapters/job_routing.h"
#include "core/batching.h"
#include "core/compat.h"
#include "core/llama.h"
#include "core/trainer.h"

namespace lorafit {

/// forward_backward, replayed from a CUDA graph wherever a batch's layout repeats: its shape,
/// whether it pads, and which job owns which rows. A layout's first pass runs eagerly (and
/// finds the tensors its backward reaches), its second is captured, and every later one
/// copies the batch and each part's reciprocal target count into the graph's inputs and
/// replays it.
/// Gradients add up in place across passes, graphed or not, as autograd's do. Packed records
/// (their cumulative lengths change from batch to batch), strategies with a term of their own
/// (MixLoRA routes on host counts) and layouts beyond kMaxGraphs run eagerly.
class StepGraphs {
 public:
  static constexpr size_t kMaxGraphs = 16;

  /// Throws ConfigError where graphs cannot serve: a device other than CUDA, or data
  /// parallelism (its all-reduce starts from hooks in the backward, which a replay skips).
  static void check(torch::Device device, int64_t world_size);

  /// trainable: every tensor of the model that may get a gradient.
  StepGraphs(torch::Device device, std::vector<torch::Tensor> trainable);

  void forward_backward(LlamaForCausalLM& model,
                        const Batch& batch,
                        const std::vector<JobRows::Span>& spans,
                        const std::vector<StepPart>& parts);

  int64_t replayed() const { return replayed_; }  // passes run from a graph
  int64_t passes() const { return passes_; }      // passes in all
  size_t captured() const { return graphs_.size(); }

 private:
  struct Layout {
    int64_t seen = 0;
    std::vector<size_t> reached;        // trainable_ indices that the backward reaches
    Batch inputs;                       // the graph's ids, labels ([B, T]) and keep ([B, T])
    torch::Tensor reciprocals;          // [P] f64: 1 / each part's target count of its step
    std::vector<torch::Tensor> grads;   // shaped as trainable_[reached[i]]: the graph adds to them
    std::vector<torch::Tensor> losses;  // [] f64 each: each part's loss, as the replay leaves it
    std::optional<size_t> graph;        // in graphs_, once captured
  };
  using Key = std::tuple<std::vector<int64_t>, bool, std::vector<std::pair<size_t, int64_t>>>;

  void eager_finding_reached(Layout& l,
                             LlamaForCausalLM& model,
                             const Batch& batch,
                             const std::vector<StepPart>& parts);
  void capture(Layout& l,
               LlamaForCausalLM& model,
               const Batch& batch,
               const std::vector<StepPart>& parts);
  void replay(Layout& l, const Batch& batch, const std::vector<StepPart>& parts);

  compat::GraphSet graphs_;
  std::vector<torch::Tensor> trainable_;
  std::map<Key, Layout> layouts_;
  int64_t replayed_ = 0, passes_ = 0;
};

}  // namespace lorafit
