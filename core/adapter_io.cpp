#include "core/adapter_io.h"

#include <filesystem>
#include <fstream>
#include <set>

#include "adapters/job_routing.h"
#include "adapters/peft_names.h"
#include "adapters/registry.h"
#include "core/errors.h"
#include "core/safetensors.h"

namespace lorafit {

namespace fs = std::filesystem;

namespace {

// The module kind that PEFT's modules_to_save lists for a checkpoint tensor:
// "model.layers.0.input_layernorm.weight" -> "input_layernorm".
std::string module_kind(const std::string& tensor_name) {
  const auto module = tensor_name.substr(0, tensor_name.rfind('.'));
  return module.substr(module.rfind('.') + 1);
}

}  // namespace

SavedAdapter read_adapter_files(const std::string& dir) {
  const fs::path config_path = fs::path(dir) / "adapter_config.json";
  const fs::path weights_path = fs::path(dir) / "adapter_model.safetensors";
  if (!fs::is_directory(dir)) throw IoError("adapter folder '" + dir + "' does not exist");
  std::ifstream in(config_path);
  if (!in) {
    throw IoError("cannot read '" + config_path.string() +
                  "' (hint: --adapter must be a PEFT adapter folder)");
  }
  SavedAdapter saved;
  try {
    in >> saved.config;
  } catch (const nlohmann::json::exception& e) {
    throw ConfigError("'" + config_path.string() + "' is not valid JSON: " + e.what());
  }
  const auto& config = saved.config;
  if (!config.is_object() || !config.contains("peft_type") || !config["peft_type"].is_string()) {
    throw ConfigError("'" + config_path.string() + "' has no \"peft_type\" string");
  }
  const fs::path bin_path = fs::path(dir) / "adapter_model.bin";
  if (fs::exists(weights_path)) {
    SafetensorsFile file(weights_path.string());
    for (const auto& e : file.header().entries) saved.tensors[e.name] = file.tensor(e.name);
  } else if (fs::exists(bin_path)) {
    saved.tensors = load_torch_bin(bin_path.string());  // m-LoRA, MoE-PEFT, older PEFT
  } else {
    throw IoError("'" + dir +
                  "' holds neither adapter_model.safetensors nor adapter_model.bin (hint: "
                  "--adapter must be a PEFT adapter folder)");
  }
  // LongLoRA's LoRA+ keeps the embeddings and norms it trained beside the adapter, named as in
  // the model: they are read as PEFT's modules_to_save.
  const fs::path trainable_path = fs::path(dir) / "trainable_params.bin";
  if (fs::exists(trainable_path)) {
    if (config.contains("modules_to_save") && !config["modules_to_save"].is_null()) {
      throw ConfigError("'" + dir +
                        "' has both modules_to_save and trainable_params.bin: which holds the "
                        "trained base tensors is unclear (hint: remove one)");
    }
    std::set<std::string> modules;
    for (auto& [name, t] : load_torch_bin(trainable_path.string())) {
      modules.insert(module_kind(name));
      saved.tensors[kPeftPrefix + name] = t;
    }
    saved.config["modules_to_save"] = std::vector<std::string>(modules.begin(), modules.end());
  }
  for (const auto& [name, t] : saved.tensors) {
    if (!torch::isFloatingType(t.scalar_type())) {
      throw ModelMismatchError("adapter tensor '" + name + "' in '" + dir + "' has dtype " +
                               st_dtype_name(to_st_dtype(t.scalar_type())) +
                               ", expected F32, F16 or BF16");
    }
  }
  return saved;
}

nlohmann::json linear_rope_scaling(double factor) {
  return {{"rope_type", "linear"}, {"factor", factor}};
}

const AdapterSpec& load_adapter(const std::string& dir, LlamaForCausalLM& model) {
  auto saved = read_adapter_files(dir);
  apply_modules_to_save(saved, model, dir);
  if (const auto it = saved.config.find("rope_scaling"); it != saved.config.end()) {
    if (!it->is_object() || it->value("rope_type", "") != "linear" || !it->contains("factor") ||
        !(*it)["factor"].is_number()) {
      throw ConfigError("adapter '" + dir + "': rope_scaling " + it->dump() +
                        " is not {\"rope_type\": \"linear\", \"factor\": F}");
    }
    model->interpolate_rope((*it)["factor"].get<double>());
  }
  const auto where = (fs::path(dir) / "adapter_config.json").string();
  const auto& spec = find_adapter_for_config(saved.config, where);
  spec.attach_saved(saved.config, saved.tensors, model->adapter_sites(), dir);
  return spec;
}

void write_adapter_files(const std::string& dir, const SavedAdapter& saved) {
  fs::create_directories(dir);
  save_safetensors((fs::path(dir) / "adapter_model.safetensors").string(), saved.tensors);
  if (saved.torch_bin_too)
    save_torch_bin((fs::path(dir) / "adapter_model.bin").string(), saved.tensors);
  write_file_atomic((fs::path(dir) / "adapter_config.json").string(), saved.config.dump(2) + "\n");
}

std::vector<torch::Tensor> trainable_parameters(LlamaForCausalLM& model,
                                                const AdapterSites& sites,
                                                const BaseFilter& base) {
  std::set<std::string> base_names;
  if (base)
    for (const auto& [name, t] : model->checkpoint_tensors())
      if (base(name)) base_names.insert(name);
  std::vector<torch::Tensor> out;
  for (auto& item : model->named_parameters(/*recurse=*/true)) {
    // Adapter tensors come from the sites: with several jobs each has its own.
    if (item.key().find(".adapter.") != std::string::npos) continue;
    const bool trains = base_names.count(item.key()) > 0;
    // A tied head shares the embedding's tensor: leave its flag to the embedding's entry.
    if (!trains && model->config.tie_word_embeddings &&
        item.value().is_same(model->model->embed_tokens->weight))
      continue;
    item.value().set_requires_grad(trains);
    if (trains) out.push_back(item.value());
  }
  for (auto& t : adapter_parameters(sites)) {
    t.set_requires_grad(true);
    out.push_back(t);
  }
  return out;
}

std::vector<torch::Tensor> trainable_parameters(LlamaForCausalLM& model, const BaseFilter& base) {
  return trainable_parameters(model, model->adapter_sites(), base);
}

void add_modules_to_save(SavedAdapter& saved,
                         const std::vector<std::pair<std::string, torch::Tensor>>& base) {
  if (base.empty()) return;
  std::set<std::string> modules;
  for (const auto& [name, t] : base) {
    saved.tensors[kPeftPrefix + name] = t.detach().to(torch::kFloat32);
    modules.insert(module_kind(name));
  }
  saved.config["modules_to_save"] = std::vector<std::string>(modules.begin(), modules.end());
}

void apply_modules_to_save(SavedAdapter& saved, LlamaForCausalLM& model, const std::string& where) {
  const auto it = saved.config.find("modules_to_save");
  if (it == saved.config.end() || it->is_null()) return;
  if (saved.tensors.count(kPeftPrefix + "model.embed_tokens.weight")) model->untie_head();
  torch::NoGradGuard no_grad;
  bool any = false;
  TensorBinding binding(saved.tensors);
  for (auto& [name, t] : model->checkpoint_tensors()) {
    const auto found = saved.tensors.find(kPeftPrefix + name);
    if (found == saved.tensors.end()) continue;
    if (binding.expect(found->first, t.sizes())) t.copy_(found->second);
    saved.tensors.erase(found);
    any = true;
  }
  binding.check("adapter '" + where + "' does not fit the model's modules_to_save",
                "is it an adapter for another model?");
  if (!any) {
    throw ModelMismatchError("adapter '" + where + "' lists modules_to_save " + it->dump() +
                             " but holds none of the model's tensors under base_model.model.");
  }
  saved.config["modules_to_save"] = nullptr;
}

}  // namespace lorafit
