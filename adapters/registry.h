// The one table of adapter strategies. Adding a strategy = one file pair (adapters/strategy.h's
// contract) + one row in registry.cpp.
#pragma once

#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "adapters/strategy.h"

namespace lorafit {

/// Every strategy, in the order help and errors list them; the first is the default type.
const std::vector<AdapterSpec>& adapter_specs();

/// The strategy of a recipe's adapter.type; a ConfigError listing the known types otherwise.
const AdapterSpec& find_adapter(const std::string& name);

/// The strategy named `name`, or nullptr.
const AdapterSpec* find_adapter_if(const std::string& name);

/// The strategy that reads a saved adapter with this adapter_config.json; a ConfigError naming
/// `where` and listing the peft_types lorafit reads otherwise.
const AdapterSpec& find_adapter_for_config(const nlohmann::json& config, const std::string& where);

/// Per projection name, a whole low-rank update: a [k, in] and b [out, k], scaling folded in.
using LowRankFactors = std::map<std::string, std::pair<torch::Tensor, torch::Tensor>>;

/// `factors` as one saved adapter in PEFT's LoRA format (rank k, lora_alpha k: scaling 1),
/// with `settings`' dropout: how COLA exports a whole chain, whatever strategy its links used.
SavedAdapter low_rank_adapter(const LowRankFactors& factors,
                              const AdapterSettings& settings,
                              const std::string& base_model);

/// Every strategy's own recipe keys, each once, in table order.
const std::vector<StrategyKey>& strategy_keys();

}  // namespace lorafit
