// The one hook every targeted Linear of a model goes through. A model builds its projections
// as `Projection`s and never looks at the adapter strategy: an adapter attaches itself to a
// projection and sees its input and its base output.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace lorafit {

/// What a strategy puts on a projection.
struct ProjectionAdapterImpl : torch::nn::Module {
  /// x: [..., in] the projection's input; base: [..., out] = x W^T.
  /// Returns the projection's output [..., out] in base's dtype.
  virtual torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& base) = 0;
  /// The fp32 update [out, in] that merging adds to the base weight, or an undefined tensor
  /// for an adapter that no dense weight can express.
  virtual torch::Tensor merged_delta() const { return {}; }
};

/// A bias-free Linear with a frozen weight and an optional adapter.
struct ProjectionImpl : torch::nn::Module {
  /// `shared_weight`, when given, is used as the weight (tied embeddings).
  ProjectionImpl(std::string name,
                 int64_t in_features,
                 int64_t out_features,
                 const torch::TensorOptions& options,
                 torch::Tensor shared_weight = {});

  /// x: [..., in] -> [..., out]
  torch::Tensor forward(const torch::Tensor& x);
  /// Puts `adapter` on this projection (replacing any other), registered as "adapter".
  void attach(std::shared_ptr<ProjectionAdapterImpl> adapter);

  std::string name;  // the weight's key without ".weight": "model.layers.0.self_attn.q_proj"
  int64_t in_features;
  int64_t out_features;
  torch::Tensor weight;  // [out, in], a parameter created frozen
  std::shared_ptr<ProjectionAdapterImpl> adapter;
};
TORCH_MODULE(Projection);

/// The projections of a model, in model order.
using Projections = std::vector<Projection>;

/// Named tensors, as a safetensors file holds them.
using TensorMap = std::map<std::string, torch::Tensor>;

/// The module name's last component ("q_proj"), which PEFT's target_modules lists match.
std::string projection_kind(const std::string& name);

/// base + scaling * xa b^T, the up-projection of a low-rank adapter, as one GEMM with the scale
/// and the residual add in its epilogue, in base's dtype (b is cast: fp32 adapter weights
/// computed in bf16, as autocast does).
/// base: [..., out], xa: [..., k], b: [out, k] -> [..., out]
torch::Tensor add_low_rank(const torch::Tensor& base,
                           const torch::Tensor& xa,
                           const torch::Tensor& b,
                           double scaling);

/// Attaches make(projection) to every projection whose kind is in `kinds`: the one loop
/// by which each strategy puts fresh adapters on a model.
void attach_to_kinds(
    const Projections& projections,
    const std::vector<std::string>& kinds,
    const std::function<std::shared_ptr<ProjectionAdapterImpl>(const ProjectionImpl&)>& make);

}  // namespace lorafit
