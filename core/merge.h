// Folding an adapter into its base: a Hugging Face checkpoint that transformers loads.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "core/llama.h"

namespace lorafit {

struct InitOptions {
  std::string from;  // folder with config.json and the tokenizer's files
  std::string out;   // new model folder; must not exist yet
  uint64_t seed = 0;
};

/// A new model with transformers' initialisation (weights N(0, 0.02), norms 1) in fp32: the
/// starting point of a model trained from scratch with full fine-tuning. Writes config.json,
/// model.safetensors and the tokenizer files of `from` into a temporary folder renamed to
/// `out` at the end.
void init_model(const InitOptions& options);

/// Writes weights (checkpoint names and tensors, as LlamaForCausalLMImpl::checkpoint_tensors
/// lists them) as a Hugging Face checkpoint into the existing folder `dir`: safetensors in
/// `dtype` (sharded at 5 GB, with an index), base_dir's config.json with its dtype updated,
/// and base_dir's tokenizer and generation files. `config_updates` overwrite config.json keys.
void write_model_files(const std::string& dir,
                       const std::vector<std::pair<std::string, torch::Tensor>>& weights,
                       const std::string& base_dir,
                       torch::Dtype dtype,
                       const nlohmann::json& config_updates = nlohmann::json::object());

/// The dtype of base_dir's weights (its embedding's).
torch::Dtype checkpoint_dtype(const std::string& base_dir);

struct MergeOptions {
  std::string model;           // base model folder
  std::string adapter;         // adapter folder
  std::string out;             // new model folder; must not exist yet
  std::string dtype = "auto";  // bf16 | f16 | f32 | auto (the base checkpoint's)
};

/// Merges in fp32 (W + delta) and casts once to the output dtype; writes config.json, sharded
/// safetensors with an index, and the base's tokenizer and generation files, into a temporary
/// folder renamed to `out` at the end.
void merge_adapter(const MergeOptions& options);

}  // namespace lorafit
