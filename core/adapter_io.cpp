#include "core/adapter_io.h"

#include <filesystem>
#include <fstream>
#include <set>

#include "adapters/registry.h"
#include "core/errors.h"
#include "core/safetensors.h"

namespace lorafit {

namespace fs = std::filesystem;

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
  if (!fs::exists(weights_path)) {
    throw IoError("'" + weights_path.string() +
                  "' is missing (hint: lorafit reads adapters saved "
                  "as safetensors, PEFT's default)");
  }
  SafetensorsFile file(weights_path.string());
  for (const auto& e : file.header().entries) {
    if (!torch::isFloatingType(to_torch_dtype(e.dtype))) {
      throw ModelMismatchError("adapter tensor '" + e.name + "' in '" + weights_path.string() +
                               "' has dtype " + st_dtype_name(e.dtype) +
                               ", expected F32, F16 or BF16");
    }
    saved.tensors[e.name] = file.tensor(e.name);
  }
  return saved;
}

void load_adapter(const std::string& dir, LlamaForCausalLM& model) {
  const auto saved = read_adapter_files(dir);
  const std::string peft_type = saved.config["peft_type"];
  const auto where = (fs::path(dir) / "adapter_config.json").string();
  const auto& spec = find_adapter_by_peft_type(peft_type, where);
  spec.attach_saved(saved.config, saved.tensors, model->adapter_sites(), dir);
}

void write_adapter_files(const std::string& dir, const SavedAdapter& saved) {
  fs::create_directories(dir);
  save_safetensors((fs::path(dir) / "adapter_model.safetensors").string(), saved.tensors);
  write_file_atomic((fs::path(dir) / "adapter_config.json").string(), saved.config.dump(2) + "\n");
}

void save_adapter(const std::string& dir,
                  const AdapterSpec& spec,
                  const AdapterSettings& settings,
                  LlamaForCausalLM& model,
                  const std::string& base_model) {
  write_adapter_files(dir, spec.save(settings, model->adapter_sites(), base_model));
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
