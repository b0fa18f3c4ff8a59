#include "adapters/registry.h"

#include <algorithm>
#include <set>

#include "adapters/dora.h"
#include "adapters/full.h"
#include "adapters/lora.h"
#include "adapters/mixlora.h"
#include "adapters/multilora.h"
#include "adapters/peft_names.h"
#include "core/errors.h"

namespace lorafit {

const std::vector<AdapterSpec>& adapter_specs() {
  static const std::vector<AdapterSpec> specs = {
      lora_strategy(),       // adapters/lora.h
      dora_strategy(),       // adapters/dora.h
      multilora_strategy(),  // adapters/multilora.h
      mixlora_strategy(),    // adapters/mixlora.h
      full_strategy(),       // adapters/full.h
  };
  return specs;
}

const AdapterSpec* find_adapter_if(const std::string& name) {
  for (const auto& spec : adapter_specs())
    if (spec.name == name) return &spec;
  return nullptr;
}

const AdapterSpec& find_adapter(const std::string& name) {
  if (const auto* spec = find_adapter_if(name)) return *spec;
  std::string known;
  for (const auto& spec : adapter_specs())
    known += (known.empty() ? "" : ", ") + std::string(spec.name);
  throw ConfigError("adapter type '" + name + "' is not one lorafit knows (known: " + known + ")");
}

const AdapterSpec& find_adapter_for_config(const nlohmann::json& config, const std::string& where) {
  std::vector<std::string> known;
  for (const auto& spec : adapter_specs()) {
    if (!spec.reads) continue;
    if (spec.reads(config)) return spec;
    if (std::find(known.begin(), known.end(), spec.peft_type) == known.end())
      known.emplace_back(spec.peft_type);
  }
  std::string list;
  for (const auto& k : known) list += (list.empty() ? "" : ", ") + k;
  throw ConfigError("'" + where + "': peft_type '" + config.value("peft_type", std::string()) +
                    "' is not one lorafit reads (known: " + list + ")");
}

SavedAdapter low_rank_adapter(const LowRankFactors& factors,
                              const AdapterSettings& settings,
                              const std::string& base_model) {
  SavedAdapter out;
  std::set<std::string> kinds;
  int64_t rank = 0;
  for (const auto& [name, ab] : factors) {
    rank = ab.first.size(0);
    kinds.insert(projection_kind(name));
    out.tensors[kPeftPrefix + name + ".lora_A.weight"] = ab.first;
    out.tensors[kPeftPrefix + name + ".lora_B.weight"] = ab.second;
  }
  AdapterSettings s = settings;
  s.r = rank;
  s.alpha = static_cast<double>(rank);  // scaling 1: the factors carry it
  s.use_rslora = false;
  out.config = peft_lora_config(s, {kinds.begin(), kinds.end()}, base_model);
  return out;
}

const std::vector<StrategyKey>& strategy_keys() {
  static const std::vector<StrategyKey> keys = [] {
    std::vector<StrategyKey> out;
    for (const auto& spec : adapter_specs()) {
      for (const auto& key : spec.keys) {
        const auto same = std::find_if(out.begin(), out.end(),
                                       [&](const StrategyKey& k) { return k.name == key.name; });
        if (same == out.end()) {
          out.push_back(key);
        } else if (same->fallback != key.fallback) {
          throw std::logic_error("strategies share the key adapter." + key.name +
                                 " with different defaults");
        }
      }
    }
    return out;
  }();
  return keys;
}

const nlohmann::json& AdapterSettings::strategy_defaults() {
  static const nlohmann::json defaults = [] {
    nlohmann::json out = nlohmann::json::object();
    for (const auto& key : strategy_keys()) out[key.name] = key.fallback;
    return out;
  }();
  return defaults;
}

}  // namespace lorafit
