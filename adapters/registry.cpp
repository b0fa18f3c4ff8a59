#include "adapters/registry.h"

#include "adapters/lora.h"
#include "adapters/multilora.h"
#include "core/errors.h"

namespace lorafit {

const std::vector<AdapterSpec>& adapter_specs() {
  static const std::vector<AdapterSpec> specs = {
      {"lora", "LORA", "low-rank update B*A on each targeted projection (PEFT's LoRA)",
       lora_attach_saved, lora_attach_new, lora_save},
      {"multilora", "MULTILORA", "n parallel LoRA modules with learnable scales (MultiLoRA)",
       multilora_attach_saved, multilora_attach_new, multilora_save},
  };
  return specs;
}

const AdapterSpec& find_adapter(const std::string& name) {
  std::string known;
  for (const auto& spec : adapter_specs()) {
    if (spec.name == name) return spec;
    known += (known.empty() ? "" : ", ") + std::string(spec.name);
  }
  throw ConfigError("adapter type '" + name + "' is not one lorafit knows (known: " + known + ")");
}

const AdapterSpec& find_adapter_by_peft_type(const std::string& peft_type,
                                             const std::string& where) {
  std::string known;
  for (const auto& spec : adapter_specs()) {
    if (spec.peft_type == peft_type) return spec;
    known += (known.empty() ? "" : ", ") + std::string(spec.peft_type);
  }
  throw ConfigError("'" + where + "': peft_type '" + peft_type +
                    "' is not one lorafit reads (known: " + known + ")");
}

}  // namespace lorafit
