// The one table of adapter strategies. Adding a strategy = one file pair + one row here.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "adapters/projection.h"

namespace lorafit {

struct AdapterSpec {
  std::string_view name;       // recipe's adapter.type
  std::string_view peft_type;  // adapter_config.json's peft_type
  std::string_view summary;
  /// Attaches a saved adapter: its parsed adapter_config.json and its tensors.
  void (*attach_saved)(const nlohmann::json& config, const TensorMap& weights,
                       const Projections& projections, const std::string& where);
};

const std::vector<AdapterSpec>& adapter_specs();

/// The strategy that reads adapters of `peft_type`; a ConfigError listing the known types
/// otherwise.
const AdapterSpec& find_adapter_by_peft_type(const std::string& peft_type,
                                             const std::string& where);

}  // namespace lorafit
