#include "core/merge.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/adapter_io.h"
#include "core/compat.h"
#include "core/errors.h"
#include "core/safetensors.h"

namespace lorafit {

namespace {

namespace fs = std::filesystem;

// transformers' default max_shard_size.
constexpr uint64_t kShardBytes = 5'000'000'000;

// Files of a model folder that are not weights and pass through a merge unchanged.
const char* const kPassThrough[] = {"tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                                    "special_tokens_map.json", "generation_config.json"};

torch::Dtype output_dtype(const std::string& name, const std::string& model_dir) {
  if (name == "bf16") return torch::kBFloat16;
  if (name == "f16") return torch::kFloat16;
  if (name == "f32") return torch::kFloat32;
  SafetensorsCheckpoint ckpt(model_dir);
  return ckpt.tensor("model.embed_tokens.weight").scalar_type();
}

const char* hf_dtype_name(torch::Dtype d) {
  return d == torch::kBFloat16 ? "bfloat16" : d == torch::kFloat16 ? "float16" : "float32";
}

}  // namespace

void merge_adapter(const MergeOptions& o) {
  if (fs::exists(o.out)) {
    throw IoError("--out '" + o.out +
                  "' already exists (hint: choose a new folder; merge never "
                  "overwrites)");
  }
  const auto dtype = output_dtype(o.dtype, o.model);
  auto model = load_llama(o.model, torch::kCPU, torch::kFloat32);
  load_adapter(o.adapter, model);

  torch::NoGradGuard no_grad;
  for (const auto& site : model->adapter_sites().ffns) {
    if (site.adapter()) {
      throw ConfigError("adapter '" + o.adapter + "' routes each token through its own experts (" +
                        site.name +
                        " is a sparse mixture), which no dense checkpoint can express (hint: "
                        "use it unmerged with --adapter in eval and generate)");
    }
  }
  for (auto p : model->projections()) {
    if (!p->adapter) continue;
    const auto delta = p->adapter->merged_delta();  // [out, in] fp32
    if (!delta.defined()) {
      throw ConfigError("adapter '" + o.adapter +
                        "' cannot be merged into a dense checkpoint "
                        "(hint: use it unmerged with --adapter)");
    }
    p->weight.add_(delta);
  }

  const fs::path tmp = o.out + ".tmp-" + std::to_string(::getpid());
  compat::remove_tree(tmp);
  fs::create_directories(tmp);
  TensorMap tensors;
  for (const auto& [name, t] : model->checkpoint_tensors()) tensors[name] = t.to(dtype);
  save_safetensors_sharded(tmp.string(), tensors, kShardBytes);

  std::ifstream in(fs::path(o.model) / "config.json");
  auto config = nlohmann::json::parse(in);
  config[config.contains("dtype") ? "dtype" : "torch_dtype"] = hf_dtype_name(dtype);
  write_file_atomic((tmp / "config.json").string(), config.dump(2) + "\n");
  for (const char* name : kPassThrough) {
    if (fs::exists(fs::path(o.model) / name)) fs::copy_file(fs::path(o.model) / name, tmp / name);
  }
  fs::rename(tmp, o.out);
}

}  // namespace lorafit
