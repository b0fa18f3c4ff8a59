#include "core/adapter_io.h"

#include <filesystem>
#include <fstream>
#include <set>

#include "adapters/registry.h"
#include "core/errors.h"
#include "core/safetensors.h"

namespace lorafit {

namespace fs = std::filesystem;

void load_adapter(const std::string& dir, LlamaForCausalLM& model) {
  const fs::path config_path = fs::path(dir) / "adapter_config.json";
  const fs::path weights_path = fs::path(dir) / "adapter_model.safetensors";
  if (!fs::is_directory(dir)) throw IoError("adapter folder '" + dir + "' does not exist");
  std::ifstream in(config_path);
  if (!in) {
    throw IoError("cannot read '" + config_path.string() +
                  "' (hint: --adapter must be a PEFT adapter folder)");
  }
  nlohmann::json config;
  try {
    in >> config;
  } catch (const nlohmann::json::exception& e) {
    throw ConfigError("'" + config_path.string() + "' is not valid JSON: " + e.what());
  }
  if (!config.is_object() || !config.contains("peft_type") || !config["peft_type"].is_string()) {
    throw ConfigError("'" + config_path.string() + "' has no \"peft_type\" string");
  }
  if (!fs::exists(weights_path)) {
    throw IoError("'" + weights_path.string() +
                  "' is missing (hint: lorafit reads adapters saved "
                  "as safetensors, PEFT's default)");
  }
  const std::string peft_type = config["peft_type"];
  const auto& spec = find_adapter_by_peft_type(peft_type, config_path.string());
  SafetensorsFile file(weights_path.string());
  TensorMap weights;
  for (const auto& e : file.header().entries) {
    if (!torch::isFloatingType(to_torch_dtype(e.dtype))) {
      throw ModelMismatchError("adapter tensor '" + e.name + "' in '" + weights_path.string() +
                               "' has dtype " + st_dtype_name(e.dtype) +
                               ", expected F32, F16 or BF16");
    }
    weights[e.name] = file.tensor(e.name);
  }
  spec.attach_saved(config, weights, model->adapter_sites(), dir);
}

}  // namespace lorafit

namespace lorafit {

void save_adapter(const std::string& dir,
                  const AdapterSpec& spec,
                  const AdapterSettings& settings,
                  LlamaForCausalLM& model,
                  const std::string& base_model) {
  fs::create_directories(dir);
  const auto saved = spec.save(settings, model->adapter_sites(), base_model);
  save_safetensors((fs::path(dir) / "adapter_model.safetensors").string(), saved.tensors);
  write_file_atomic((fs::path(dir) / "adapter_config.json").string(), saved.config.dump(2) + "\n");
}

std::vector<torch::Tensor> trainable_parameters(LlamaForCausalLM& model, bool base) {
  std::set<std::string> base_names;
  if (base)
    for (const auto& [name, t] : model->checkpoint_tensors()) base_names.insert(name);
  std::vector<torch::Tensor> out;
  for (auto& item : model->named_parameters(/*recurse=*/true)) {
    const bool adapter = item.key().find(".adapter.") != std::string::npos;
    const bool trains = adapter || base_names.count(item.key()) > 0;
    // A tied head shares the embedding's tensor: leave its flag to the embedding's entry.
    if (!trains && base && item.value().is_same(model->model->embed_tokens->weight)) continue;
    item.value().set_requires_grad(trains);
    if (trains) out.push_back(item.value());
  }
  return out;
}

}  // namespace lorafit
