#include "adapters/registry.h"

#include "adapters/lora.h"
#include "adapters/mixlora.h"
#include "adapters/multilora.h"
#include "core/errors.h"

namespace lorafit {

namespace {

// A strategy that only puts adapters on projections, as an AdapterSpec row's three functions.
template <auto AttachSaved, auto AttachNew, auto Save>
struct OnProjections {
  static void attach_saved(const nlohmann::json& config,
                           const TensorMap& weights,
                           const AdapterSites& sites,
                           const std::string& where) {
    AttachSaved(config, weights, sites.projections, where);
  }
  static void attach_new(const AdapterSettings& settings, const AdapterSites& sites) {
    AttachNew(settings, sites.projections);
  }
  static SavedAdapter save(const AdapterSettings& settings,
                           const AdapterSites& sites,
                           const std::string& base_model) {
    return Save(settings, sites.projections, base_model);
  }
};

// Full fine-tuning attaches and saves nothing: the base's own weights are what trains.
struct NoAdapter {
  static void attach_saved(const nlohmann::json&,
                           const TensorMap&,
                           const AdapterSites&,
                           const std::string& where) {
    throw ConfigError("'" + where + "' is a full model, not an adapter (hint: pass it as --model)");
  }
  static void attach_new(const AdapterSettings&, const AdapterSites&) {}
  static SavedAdapter save(const AdapterSettings&, const AdapterSites&, const std::string&) {
    return {};
  }
};

template <typename S>
AdapterSpec row(std::string_view name, std::string_view peft_type, std::string_view summary) {
  return {name, peft_type, summary, S::attach_saved, S::attach_new, S::save};
}

}  // namespace

const std::vector<AdapterSpec>& adapter_specs() {
  using Lora = OnProjections<lora_attach_saved, lora_attach_new, lora_save>;
  using MultiLora = OnProjections<multilora_attach_saved, multilora_attach_new, multilora_save>;
  static const std::vector<AdapterSpec> specs = {
      row<Lora>("lora", "LORA", "low-rank update B*A on each targeted projection (PEFT's LoRA)"),
      row<MultiLora>("multilora", "MULTILORA",
                     "n parallel LoRA modules with learnable scales (MultiLoRA)"),
      {"mixlora", "MIXLORA",
       "top-k mixture of LoRA experts on the frozen MLP, LoRA on attention (MixLoRA)",
       mixlora_attach_saved, mixlora_attach_new, mixlora_save, mixlora_aux_loss,
       mixlora_step_metrics},
      {"full", "", "every weight of the model trains in fp32 (full fine-tuning); writes a model",
       NoAdapter::attach_saved, NoAdapter::attach_new, NoAdapter::save, nullptr, nullptr,
       /*trains_base=*/true},
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
    if (spec.peft_type.empty()) continue;
    if (spec.peft_type == peft_type) return spec;
    known += (known.empty() ? "" : ", ") + std::string(spec.peft_type);
  }
  throw ConfigError("'" + where + "': peft_type '" + peft_type +
                    "' is not one lorafit reads (known: " + known + ")");
}

}  // namespace lorafit
