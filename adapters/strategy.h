// The contract between lorafit and an adapter strategy. A strategy is one file pair that
// builds an AdapterSpec: its recipe keys and their checks, what it can do (chain, merge, share
// a base with other jobs), which saved adapters it reads, and the functions that attach, save
// and load it. adapters/registry.cpp lists the strategies; nothing else names one.
#pragma once

#include <cmath>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/projection.h"
#include "core/safetensors.h"

namespace lorafit {

/// A key a strategy adds to the recipe's `adapter:` block (adapter.<name>).
struct StrategyKey {
  StrategyKey(std::string name_, nlohmann::json fallback_)
      : name(std::move(name_)), fallback(std::move(fallback_)) {}

  std::string name;           // "num_experts"
  nlohmann::json fallback;    // the default; its JSON type (integer, number, boolean, string)
                              // is the key's type
  std::optional<double> min;  // inclusive
  bool below_one = false;     // < 1
  std::vector<std::string> one_of;
  /// Shown in the resolved recipe (and compared on resume) only when not the default.
  bool only_when_set = false;
};

/// A new adapter's settings, from the recipe's `adapter:` block.
struct AdapterSettings {
  int64_t r = 16;
  double alpha = 32;
  double dropout = 0.0;
  bool use_rslora = false;
  std::vector<std::string> targets;  // projection kinds: "q_proj", ...
  /// The strategies' own keys (StrategyKey::name -> value): every strategy's, at its default
  /// unless the recipe sets it.
  nlohmann::json options = strategy_defaults();

  /// Every strategy's keys at their defaults (adapters/registry.cpp).
  static const nlohmann::json& strategy_defaults();
};

/// An adapter as it goes to disk: adapter_config.json and the tensors of
/// adapter_model.safetensors.
struct SavedAdapter {
  nlohmann::json config;
  TensorMap tensors;
  /// Also written as adapter_model.bin (torch.save), for the tools that read only that file
  /// (MoE-PEFT and the MixLoRA package).
  bool torch_bin_too = false;
  /// Told to the user when the run's adapter is written: what another tool will refuse.
  std::vector<std::string> notes;
};

/// A number as the PEFT-family tools want it in adapter_config.json: an integer when whole
/// (MoE-PEFT asserts that lora_alpha is an int; PEFT takes either).
inline nlohmann::json config_number(double v) {
  return v == std::floor(v) && std::abs(v) < 9e15 ? nlohmann::json(static_cast<int64_t>(v))
                                                  : nlohmann::json(v);
}

struct AdapterSpec {
  std::string_view name;       // recipe's adapter.type
  std::string_view peft_type;  // adapter_config.json's peft_type ("" for none)
  std::string_view summary;
  std::vector<StrategyKey> keys;  // its own recipe keys, beside r, alpha, dropout, ...
  /// Whether a saved adapter with this adapter_config.json is this strategy's (its peft_type,
  /// and any key that tells strategies of one peft_type apart, such as use_dora).
  bool (*reads)(const nlohmann::json& config) = nullptr;
  /// Problems among the settings that no single key's range catches, each naming its keys.
  void (*check)(const AdapterSettings& settings, std::vector<std::string>& problems) = nullptr;
  /// Attaches a saved adapter: its parsed adapter_config.json and its tensors.
  void (*attach_saved)(const nlohmann::json& config,
                       const TensorMap& weights,
                       const AdapterSites& sites,
                       const std::string& where) = nullptr;
  /// Attaches freshly initialised adapters to the sites the settings target.
  void (*attach_new)(const AdapterSettings& settings, const AdapterSites& sites) = nullptr;
  /// The attached adapters in their on-disk form.
  SavedAdapter (*save)(const AdapterSettings& settings,
                       const AdapterSites& sites,
                       const std::string& base_model) = nullptr;
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
  /// functions are no-ops), and the run writes a whole model instead of an adapter; the
  /// adapter keys (r, alpha, dropout, targets, use_rslora) do not apply.
  bool trains_base = false;
  /// COLA can chain it: its update on each projection is one low-rank term (b a) that a knot
  /// merges into the base before a fresh adapter starts.
  bool chains = false;
  /// Its projection adapters have a dense update (merged_delta) and it puts none on MLPs.
  bool mergeable = true;
  /// It can train beside other jobs on a shared frozen base.
  bool in_jobs = true;
  /// LongLoRA's trainable embeddings and norms can go with it (saved as PEFT's
  /// modules_to_save).
  bool with_trainable_base = true;
};

/// Fills `spec`'s attach_saved, attach_new and save from functions over the projections alone,
/// for a strategy that puts nothing on MLP blocks.
template <auto AttachSaved, auto AttachNew, auto Save>
void on_projections(AdapterSpec& spec) {
  spec.attach_saved = [](const nlohmann::json& config, const TensorMap& weights,
                         const AdapterSites& sites, const std::string& where) {
    AttachSaved(config, weights, sites.projections, where);
  };
  spec.attach_new = [](const AdapterSettings& s, const AdapterSites& sites) {
    AttachNew(s, sites.projections);
  };
  spec.save = [](const AdapterSettings& s, const AdapterSites& sites, const std::string& base) {
    return Save(s, sites.projections, base);
  };
}

}  // namespace lorafit
