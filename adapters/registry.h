// The one table of adapter strategies. Adding a strategy = one file pair + one row here.
#pragma once

#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "adapters/projection.h"

namespace lorafit {

/// A new adapter's settings, from the recipe's `adapter:` block.
struct AdapterSettings {
  int64_t r = 16;
  double alpha = 32;
  double dropout = 0.0;
  bool use_rslora = false;
  std::vector<std::string> targets;  // projection kinds: "q_proj", ...
  int64_t n = 3;                     // multilora: parallel modules per projection
  bool vector_scale = true;          // multilora: a scale per output channel, else one per module
  int64_t experts = 8;               // mixlora: experts per MLP
  int64_t top_k = 2;                 // mixlora: experts per token
  double router_aux_loss_coef = 0;   // mixlora: the load-balancing loss's weight
  int64_t expert_r = 16;             // mixlora: the experts' LoRA (MoE-PEFT's expert_lora)
  double expert_alpha = 32;
  double expert_dropout = 0.0;
};

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

/// An adapter as it goes to disk: adapter_config.json and the tensors of
/// adapter_model.safetensors.
struct SavedAdapter {
  nlohmann::json config;
  TensorMap tensors;
};

struct AdapterSpec {
  std::string_view name;       // recipe's adapter.type
  std::string_view peft_type;  // adapter_config.json's peft_type
  std::string_view summary;
  /// Attaches a saved adapter: its parsed adapter_config.json and its tensors.
  void (*attach_saved)(const nlohmann::json& config,
                       const TensorMap& weights,
                       const AdapterSites& sites,
                       const std::string& where);
  /// Attaches freshly initialised adapters to the sites the settings target.
  void (*attach_new)(const AdapterSettings& settings, const AdapterSites& sites);
  /// The attached adapters in their on-disk form.
  SavedAdapter (*save)(const AdapterSettings& settings,
                       const AdapterSites& sites,
                       const std::string& base_model);
  /// The strategy's own term of the training loss for the last forward pass (MixLoRA's
  /// load balancing) times `scale`, nullptr if none. keep: [N] bool, the real (unpadded)
  /// tokens. Where that forward kept no graph (checkpointed layers), the strategy routes the
  /// term's gradient into the layers' recomputation itself.
  torch::Tensor (*aux_loss)(const AdapterSettings& settings,
                            const AdapterSites& sites,
                            const torch::Tensor& keep,
                            double scale) = nullptr;
  /// Fields the strategy adds to a logged metrics.jsonl line (MixLoRA: each layer's expert
  /// load over the last micro-batch), nullptr if none.
  nlohmann::json (*step_metrics)(const AdapterSettings& settings,
                                 const AdapterSites& sites) = nullptr;
  /// Full fine-tuning: every base weight trains, nothing is attached (the attach and save
  /// functions are no-ops), and the run writes a whole model instead of an adapter.
  bool trains_base = false;
};

/// The strategy of a recipe's adapter.type; a ConfigError listing the known types otherwise.
const AdapterSpec& find_adapter(const std::string& name);

const std::vector<AdapterSpec>& adapter_specs();

/// The strategy that reads adapters of `peft_type`; a ConfigError listing the known types
/// otherwise.
const AdapterSpec& find_adapter_by_peft_type(const std::string& peft_type,
                                             const std::string& where);

}  // namespace lorafit
