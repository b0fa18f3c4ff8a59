// MultiLoRA (arXiv 2311.11501): n parallel LoRA modules per projection with learnable scales,
//   y = x W^T + (alpha / r) * sum_i (dropout(x) A_i^T B_i^T) * s_i,
// A_i and B_i kaiming-uniform (B not zero), s_i = 0 at the start (so the layer starts as the
// base), s_i per output channel ("vector") or one per module ("scalar"). In fp32.
//
// On disk (lorafit's format; PEFT has no MultiLoRA): adapter_config.json with peft_type
// "MULTILORA", r, lora_alpha, lora_dropout, use_rslora, n, scale ("vector" | "scalar"),
// target_modules, base_model_name_or_path, task_type; tensors per targeted module M and
// module index i:
//   base_model.model.M.lora_A.{i}.weight  [r, in]
//   base_model.model.M.lora_B.{i}.weight  [out, r]
//   base_model.model.M.lora_scale.{i}     [out] (vector) or [1] (scalar)
#pragma once

#include <nlohmann/json.hpp>

#include "adapters/strategy.h"
#include "core/projection.h"

namespace lorafit {

struct MultiLoraImpl : ProjectionAdapterImpl {
  MultiLoraImpl(int64_t in_features,
                int64_t out_features,
                int64_t r,
                int64_t n,
                double scaling,
                double dropout,
                bool vector_scale,
                const torch::TensorOptions& options);
  /// All modules as one low-rank pair: a = [A_1; ...; A_n], b = [s_1 B_1, ..., s_n B_n].
  std::optional<LowRank> low_rank() const override;
  /// scaling * sum_i diag(s_i) B_i A_i, in fp32.
  torch::Tensor merged_delta() const override;

  torch::Tensor lora_A;  // [n, r, in]
  torch::Tensor lora_B;  // [n, out, r]
  torch::Tensor scale;   // [n, out] or [n, 1]
  double scaling;
  double dropout;
};
TORCH_MODULE(MultiLora);

void multilora_attach_new(const AdapterSettings& settings, const Projections& projections);
SavedAdapter multilora_save(const AdapterSettings& settings,
                            const Projections& projections,
                            const std::string& base_model);
void multilora_attach_saved(const nlohmann::json& config,
                            const TensorMap& weights,
                            const Projections& projections,
                            const std::string& where);

/// MultiLoRA's row of the strategy table: keys adapter.n (modules per projection, 3) and
/// adapter.scale (vector | scalar); COLA chains it.
AdapterSpec multilora_strategy();

}  // namespace lorafit
