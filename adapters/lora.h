// LoRA with PEFT's math: y = x W^T + s * B(A(dropout(x))), s = alpha / r (or alpha / sqrt(r)
// with rsLoRA); A and B kept in fp32 whatever the base dtype, computed in the base's.
#pragma once

#include <functional>
#include <nlohmann/json.hpp>

#include "adapters/strategy.h"
#include "core/projection.h"

namespace lorafit {

struct LoraImpl : ProjectionAdapterImpl {
  LoraImpl(int64_t in_features,
           int64_t out_features,
           int64_t r,
           double scaling,
           double dropout,
           const torch::TensorOptions& options);
  /// A and B cast to `dtype`: fp32 weights computed in the activations' dtype (autocast's
  /// mixed precision, as PEFT under the HF Trainer with bf16).
  std::optional<LowRank> low_rank() const override;
  /// scaling * B A, in fp32.
  torch::Tensor merged_delta() const override;

  torch::Tensor lora_A;  // [r, in]
  torch::Tensor lora_B;  // [out, r]
  double scaling;
  double dropout;
};
TORCH_MODULE(Lora);

/// PEFT's rule for which modules an adapter_config.json's target_modules selects: a string is
/// a regular expression over the whole module name ("all-linear": every projection but the
/// head); a list matches a name equal to an entry or ending in "." + entry.
bool peft_targets(const nlohmann::json& targets, const std::string& name);

/// alpha / r, or alpha / sqrt(r) with rsLoRA.
double lora_scaling(double alpha, int64_t r, bool rslora);

/// One projection's update as a saved PEFT LoRA-format adapter gives it.
struct SavedLoraFactors {
  torch::Tensor a;  // [r, in]
  torch::Tensor b;  // [out, r]
  double scaling = 1.0;
  double dropout = 0.0;
};

/// Copies saved factors (shapes already checked) into a LoRA of the same rank.
void load_factors(LoraImpl& lora, const SavedLoraFactors& factors);

/// What a LoRA-format strategy builds from one projection's saved factors and its `extra`
/// tensors (one per suffix asked for, already found); nullptr after recording a problem.
using LoraFormatMake =
    std::function<std::shared_ptr<ProjectionAdapterImpl>(const ProjectionImpl& projection,
                                                         const SavedLoraFactors& factors,
                                                         const std::vector<torch::Tensor>& extra,
                                                         TensorBinding& binding)>;

/// Reads a saved adapter in PEFT's LoRA format, which LoRA and DoRA share: checks
/// adapter_config.json (its use_dora must be `use_dora`), and attaches make(...) to every
/// projection that its target_modules select, with its lora_A, lora_B, scaling (lora_alpha,
/// rank_pattern, alpha_pattern, use_rslora) and dropout, and its tensors
/// base_model.model.<module><suffix> for each of `extra_suffixes`. Every missing, mis-shaped or
/// unexpected tensor is reported at once, naming `where`.
void attach_lora_format(const nlohmann::json& config,
                        const TensorMap& weights,
                        const Projections& projections,
                        const std::string& where,
                        bool use_dora,
                        const std::vector<std::string>& extra_suffixes,
                        const LoraFormatMake& make);

/// Attaches a saved PEFT LoRA adapter (adapter_config.json already parsed, tensors read) to the
/// projections that its target_modules select. `where` names the adapter folder in messages.
void lora_attach_saved(const nlohmann::json& config,
                       const TensorMap& weights,
                       const Projections& projections,
                       const std::string& where);

/// A fresh LoRA (A ~ kaiming_uniform(a=sqrt(5)), B = 0) on every projection whose kind is in
/// settings.targets.
void lora_attach_new(const AdapterSettings& settings, const Projections& projections);

/// PEFT's adapter_config.json for a LoRA of these settings on these projection kinds.
nlohmann::json peft_lora_config(const AdapterSettings& settings,
                                const std::vector<std::string>& target_kinds,
                                const std::string& base_model);

/// PEFT's adapter_config.json and tensors (keys base_model.model.<module>.lora_{A,B}.weight,
/// fp32) for the LoRAs (and LoRA-derived adapters) attached to `projections`.
SavedAdapter lora_save(const AdapterSettings& settings,
                       const Projections& projections,
                       const std::string& base_model);

/// LoRA's row of the strategy table: PEFT's peft_type LORA without use_dora; COLA chains it.
AdapterSpec lora_strategy();

}  // namespace lorafit
