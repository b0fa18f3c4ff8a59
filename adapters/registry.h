// The one table of adapter strategies. Adding a strategy = one file pair (adapters/strategy.h's
// contract) + one row in registry.cpp.
#pragma once

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

/// Every strategy's own recipe keys, each once, in table order.
const std::vector<StrategyKey>& strategy_keys();

}  // namespace lorafit
