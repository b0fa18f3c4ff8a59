#include "core/merge.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/adapter_io.h"
#include "core/device.h"
#include "core/errors.h"
#include "core/run_dir.h"
#include "core/safetensors.h"
#include "tokenizer/tokenizer.h"

namespace lorafit {

namespace {

namespace fs = std::filesystem;

// transformers' default max_shard_size.
constexpr uint64_t kShardBytes = 5'000'000'000;

// Files of a model folder that are not weights and pass through a merge unchanged.
const char* const kPassThrough[] = {"tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                                    "special_tokens_map.json", "generation_config.json"};

const char* hf_dtype_name(torch::Dtype d) {
  return d == torch::kBFloat16 ? "bfloat16" : d == torch::kFloat16 ? "float16" : "float32";
}

}  // namespace

torch::Dtype checkpoint_dtype(const std::string& base_dir) {
  SafetensorsCheckpoint ckpt(base_dir);
  return ckpt.tensor("model.embed_tokens.weight").scalar_type();
}

void write_model_files(const std::string& dir,
                       const std::vector<std::pair<std::string, torch::Tensor>>& weights,
                       const std::string& base_dir,
                       torch::Dtype dtype,
                       const nlohmann::json& config_updates) {
  torch::NoGradGuard no_grad;
  TensorMap tensors;
  for (const auto& [name, t] : weights) tensors[name] = t.to(torch::kCPU, dtype);
  save_safetensors_sharded(dir, tensors, kShardBytes);
  std::ifstream in(fs::path(base_dir) / "config.json");
  auto config = nlohmann::json::parse(in);
  config[config.contains("dtype") ? "dtype" : "torch_dtype"] = hf_dtype_name(dtype);
  // A head written on its own is untied (LongLoRA trained the embedding, not the head).
  if (tensors.count("lm_head.weight")) config["tie_word_embeddings"] = false;
  config.update(config_updates);
  write_file_atomic((fs::path(dir) / "config.json").string(), config.dump(2) + "\n");
  for (const char* name : kPassThrough) {
    const auto from = fs::path(base_dir) / name, to = fs::path(dir) / name;
    if (fs::exists(from)) fs::copy_file(from, to, fs::copy_options::overwrite_existing);
  }
}

namespace {

void refuse_existing(const std::string& out) {
  if (fs::exists(out)) {
    throw IoError("--out '" + out +
                  "' already exists (hint: choose a new folder; lorafit never "
                  "overwrites a model)");
  }
}

// Writes the model into a temporary folder and renames it to `out`; a merge killed earlier
// left its temporary folder, which goes first.
void write_new_model_folder(const std::string& out,
                            LlamaForCausalLM& model,
                            const std::string& base_dir,
                            torch::Dtype dtype) {
  remove_stale_siblings(out);
  // A model whose RoPE the adapter interpolates (LongLoRA) says so in its config, in the
  // base config's spelling, so that transformers runs it at the new length.
  nlohmann::json updates = nlohmann::json::object();
  const auto& rope = model->config.rope;
  if (rope.type == RopeType::Linear && load_llama_config(base_dir).rope.type != RopeType::Linear) {
    std::ifstream in(fs::path(base_dir) / "config.json");
    if (nlohmann::json::parse(in).contains("rope_parameters")) {
      updates["rope_parameters"] = {
          {"rope_type", "linear"}, {"rope_theta", rope.theta}, {"factor", rope.factor}};
    } else {
      updates["rope_scaling"] = {
          {"rope_type", "linear"}, {"type", "linear"}, {"factor", rope.factor}};
    }
  }
  write_folder_atomic(out, [&](const std::string& tmp) {
    write_model_files(tmp, model->checkpoint_tensors(), base_dir, dtype, updates);
  });
}

}  // namespace

void init_model(const InitOptions& o) {
  refuse_existing(o.out);
  const auto config = load_llama_config(o.from);
  if (!has_tokenizer(o.from)) {
    throw IoError("--from '" + o.from +
                  "' has no tokenizer.json or tokenizer.model (hint: the new model needs its "
                  "tokenizer beside config.json)");
  }
  auto model = random_llama(config, torch::kCPU, torch::kFloat32, o.seed);
  write_new_model_folder(o.out, model, o.from, torch::kFloat32);
}

void merge_adapter(const MergeOptions& o) {
  refuse_existing(o.out);
  const auto dtype =
      o.dtype == "auto" ? checkpoint_dtype(o.model) : pick_dtype(o.dtype, torch::kCPU);
  auto model = load_llama(o.model, torch::kCPU, torch::kFloat32);
  const auto& spec = load_adapter(o.adapter, model);
  if (!spec.mergeable) {
    throw ConfigError("adapter '" + o.adapter + "' is a " + std::string(spec.name) +
                      " adapter, which no dense checkpoint can express (hint: use it unmerged "
                      "with --adapter in eval and generate)");
  }
  torch::NoGradGuard no_grad;
  for (auto p : model->projections()) {
    if (!p->adapter) continue;
    const auto delta = p->adapter->merged_delta();  // [out, in] fp32
    TORCH_CHECK(delta.defined(), "a mergeable strategy left ", p->name, " without a dense update");
    p->weight.add_(delta);
  }

  write_new_model_folder(o.out, model, o.model, dtype);
}

}  // namespace lorafit
