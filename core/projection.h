// The one hook every targeted Linear of a model goes through, and the sites a model offers
// adapters (its projections and MLP blocks): the types the model and the strategies share. A
// model builds its projections as `Projection`s and never looks at the adapter strategy: an
// adapter attaches itself to a projection and sees its input and its base output.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/nf4.h"

namespace lorafit {

/// A frozen base weight W [out, in] as the base GEMM reads it: dense, or row blocks in NF4 (a
/// group's members in order, each quantized on its own as bitsandbytes quantizes each Linear).
/// NF4 blocks are dequantized into a transient buffer by each GEMM that reads them (forward and
/// backward), so no full-precision copy of a quantized base stays resident.
struct BaseWeight {
  BaseWeight(torch::Tensor w = {}) : dense(std::move(w)) {}  // NOLINT: a dense W reads as one
  explicit BaseWeight(std::vector<Nf4Weight> b) : blocks(std::move(b)) {}

  torch::Tensor dense;            // [out, in], or undefined
  std::vector<Nf4Weight> blocks;  // W's rows in NF4, when dense is undefined
  int64_t rows() const;
  int64_t cols() const;
  /// W [out, in] in `dtype`: the dense tensor (cast if it must be), or the blocks dequantized.
  torch::Tensor materialize(torch::ScalarType dtype) const;
};

/// One term of a projection's low-rank update: rows [row_begin, row_end) of the batch (every
/// row when row_end is 0) get scaling * (x a^T) b^T in the output columns [col, col + out_t).
/// With `out_scale`, that region of the whole output (base and update) is then multiplied by
/// it column by column, before any bias (a weight-decomposed strategy's magnitudes). A region
/// with an out_scale has no other term. a, b and out_scale may be in any floating dtype (an
/// adapter's fp32 parameters): the projection computes in the activations' dtype and returns
/// their gradients in theirs.
struct LowRankTerm {
  LowRankTerm() = default;
  LowRankTerm(torch::Tensor a_, torch::Tensor b_, double scaling_, torch::Tensor out_scale_ = {})
      : a(std::move(a_)), b(std::move(b_)), scaling(scaling_), out_scale(std::move(out_scale_)) {}

  torch::Tensor a;  // [k, in]
  torch::Tensor b;  // [out_t, k]
  double scaling = 1.0;
  int64_t row_begin = 0, row_end = 0;  // batch rows
  int64_t col = 0;                     // the first output column
  torch::Tensor out_scale;             // [out_t], or undefined
};

/// A low-rank update of a projection: y = x W^T + its terms. Several terms are several
/// adapters' updates (the projections of a group, or jobs each on its own rows).
struct LowRank {
  std::vector<LowRankTerm> terms;
  double dropout = 0.0;    // on the adapter's input only, as PEFT (then one term, all rows)
  int64_t batch_rows = 0;  // what the terms' row ranges count (x: [rows, ...] or [rows * T, in])
};

/// What a strategy puts on a projection. A low-rank strategy (LoRA, MultiLoRA) only describes
/// its factors and the projection runs them, all through one fused path; any other computes
/// the output from the input and the base output.
struct ProjectionAdapterImpl : torch::nn::Module {
  /// The factors, differentiable with respect to the adapter's own parameters; std::nullopt
  /// for an adapter that is not low-rank.
  virtual std::optional<LowRank> low_rank() const { return std::nullopt; }
  /// x: [..., in] the projection's input; base: [..., out] = x W^T.
  /// Returns the projection's output [..., out] in base's dtype.
  virtual torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& base);
  /// The fp32 update [out, in] that merging adds to the base weight, or an undefined tensor
  /// for an adapter that no dense weight can express.
  virtual torch::Tensor merged_delta() const { return {}; }
};

/// What a strategy puts on a whole feed-forward block (the SwiGLU MLP), the hook beside the
/// projection one for strategies that route tokens (MixLoRA): it sees the block's input and
/// its frozen weights and computes the block's output.
struct FfnAdapterImpl : torch::nn::Module {
  /// x: [N, C], gate_up: [2I, C] (gate's rows, then up's), down: [C, I] -> [N, C] in x's dtype
  virtual torch::Tensor forward(const torch::Tensor& x,
                                const torch::Tensor& gate_up,
                                const torch::Tensor& down) = 0;
  /// After a forward that recomputes a checkpointed layer: a scalar whose gradient carries the
  /// adapter's own loss terms into this layer's backward (undefined if none). Taken once.
  virtual torch::Tensor take_backward_root() { return {}; }
};

/// A Linear with a frozen weight, an optional frozen bias and an optional adapter. The bias is
/// added after the adapter, as PEFT's base layer adds it: adapters see x W^T.
struct ProjectionImpl : torch::nn::Module {
  /// `shared_weight`, when given, is used as the weight (tied embeddings, a view of a group's
  /// stacked weights); `bias`, when given, becomes the "bias" parameter (Qwen2's q, k, v).
  /// A `quantized` projection has no dense weight: quantize() gives it its NF4 one.
  ProjectionImpl(std::string name,
                 int64_t in_features,
                 int64_t out_features,
                 const torch::TensorOptions& options,
                 torch::Tensor shared_weight = {},
                 torch::Tensor bias = {},
                 bool quantized = false);

  /// x: [..., in] -> [..., out]. With `value_needed` false (recomputation for a backward
  /// pass that only needs the graph) a frozen plain or low-rank projection skips its output
  /// GEMMs and returns uninitialised memory that carries the graph.
  torch::Tensor forward(const torch::Tensor& x, bool value_needed = true);
  /// Puts `adapter` on this projection (replacing any other), registered as "adapter".
  void attach(std::shared_ptr<ProjectionAdapterImpl> adapter);
  /// Stores w [out, in] (any floating dtype, on the projection's device) as its NF4 weight.
  void quantize(const torch::Tensor& w);
  bool quantized() const { return nf4.defined(); }
  /// The frozen weight as the base GEMM reads it.
  BaseWeight base() const;
  /// x W^T (+ the merged links of a quantized base), differentiable in x: what a non-low-rank
  /// adapter gets as its base output. x: [..., in] -> [..., out]
  torch::Tensor base_output(const torch::Tensor& x) const;
  /// Where the weight lives, and the activations' dtype.
  torch::Device device() const { return options.device(); }

  std::string name;  // the weight's key without ".weight": "model.layers.0.self_attn.q_proj"
  int64_t in_features;
  int64_t out_features;
  torch::TensorOptions options;  // the dense weight's (or, quantized, the compute) dtype, device
  torch::Tensor weight;          // [out, in], a parameter created frozen; undefined if quantized
  Nf4Weight nf4;                 // the weight in NF4 (quantize: nf4), else undefined
  /// COLA's links merged into a quantized base, which 4 bits cannot hold exactly: kept as one
  /// frozen low-rank term (a [K, in], b [out, K] with the scalings in b, fp32) beside the NF4
  /// weight; undefined a before the first knot.
  LowRankTerm merged;
  torch::Tensor bias;  // [out], frozen; undefined for a bias-free projection
  std::shared_ptr<ProjectionAdapterImpl> adapter;
};
TORCH_MODULE(Projection);

/// The projections of a model, in model order.
using Projections = std::vector<Projection>;

/// The module name's last component ("q_proj"), which PEFT's target_modules lists match.
std::string projection_kind(const std::string& name);

/// x W^T plus the update's terms (then their output scales), with a hand-written backward: the
/// output is kept for a scale's gradient (sum over rows of dy * y / scale, so a column whose
/// scale is exactly 0 gets none); the terms that share rows share one down-projection GEMM
/// (their a stacked, cast once to x's dtype), the input gradient is one GEMM accumulating into
/// another (dy W + (dy b) a, no separate add), and the frozen weight gets no gradient. Where
/// the terms cover every row (one job), the up-projections (and the input gradient's low-rank
/// part) are written first and the base GEMM adds onto them; otherwise they add into the base
/// output in place. No autograd node is made per term. Consecutive fused jobs whose terms are
/// alike (as many rows each, the same terms on the same columns, any ranks) run as one batch of
/// GEMMs, so that the launches do not grow with the jobs. The factors' copies in x's dtype are
/// made once per change of the parameters. With `value_needed` false only what the backward
/// needs is computed. A quantized weight is dequantized in the forward and again in the
/// backward. x: [..., in], weight: W [out, in] -> [..., out]
torch::Tensor low_rank_linear(const torch::Tensor& x,
                              const BaseWeight& weight,
                              const LowRank& update,
                              bool value_needed = true);

/// base + the adapter's update on x through plain autograd (with dropout on the adapter's
/// input while training), or what a non-low-rank adapter computes. x: [..., in],
/// base: [..., out] = x W^T -> [..., out]
torch::Tensor adapted_output(ProjectionAdapterImpl& adapter,
                             const torch::Tensor& x,
                             const torch::Tensor& base);

/// Projections that read the same input, run as one: `weight` [sum of outs, in] is the
/// projections' weights stacked in order, which their own weights view (the model allocates
/// them so). Their low-rank terms run in one low_rank_linear, each on its member's columns:
/// the group costs one base GEMM and one down-projection per row range. Any adapter that is
/// not low-rank, an active dropout, a trained base weight, or weights that no longer view
/// `weight` (a model moved after it was built) send every projection through its own forward
/// instead. `bias` [sum of outs], when the projections have biases, is theirs stacked the same
/// way (undefined when they have none). Quantized projections have no stacked dense weight:
/// `weight` is then undefined and their NF4 weights make the group's, block by block.
/// `value_needed` as ProjectionImpl::forward's.
/// x: [..., in] -> [..., sum of outs], each projection's output in its columns.
torch::Tensor project_group(const torch::Tensor& x,
                            const torch::Tensor& weight,
                            const std::vector<ProjectionImpl*>& group,
                            const torch::Tensor& bias = {},
                            bool value_needed = true);

/// Attaches make(projection) to every projection whose kind is in `kinds`: the one loop
/// by which each strategy puts fresh adapters on a model.
void attach_to_kinds(
    const Projections& projections,
    const std::vector<std::string>& kinds,
    const std::function<std::shared_ptr<ProjectionAdapterImpl>(const ProjectionImpl&)>& make);

/// A model's MLP block, where a block-level adapter (MixLoRA) goes.
struct FfnSite {
  std::string name;  // "model.layers.3.mlp"
  int64_t hidden = 0;
  int64_t intermediate = 0;
  torch::Device device = torch::kCPU;  // the block's weights'
  std::function<void(std::shared_ptr<FfnAdapterImpl>)> attach;
  std::function<std::shared_ptr<FfnAdapterImpl>()> adapter;  // the attached one, or nullptr
  /// The block through its own projections, ignoring any block adapter: x [N, C] -> [N, C].
  std::function<torch::Tensor(const torch::Tensor&)> plain;
};

/// Everything of a model that a strategy can put adapters on, in model order.
struct AdapterSites {
  Projections projections;
  std::vector<FfnSite> ffns;
};

}  // namespace lorafit
