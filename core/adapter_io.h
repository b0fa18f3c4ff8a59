// Saved adapters on disk: a folder with adapter_config.json and adapter_model.safetensors.
#pragma once

#include <string>

#include "adapters/registry.h"
#include "core/llama.h"

namespace lorafit {

/// adapter_config.json (with a peft_type) and the floating-point tensors of
/// adapter_model.safetensors in `dir`; an IoError or ConfigError naming the file otherwise.
SavedAdapter read_adapter_files(const std::string& dir);

/// Writes adapter_config.json and adapter_model.safetensors into `dir` (created if needed),
/// each through a temporary name.
void write_adapter_files(const std::string& dir, const SavedAdapter& saved);

/// Reads the adapter in `dir` and attaches it to `model`'s projections through the strategy
/// that its peft_type names. Every mismatch with the model is reported at once.
void load_adapter(const std::string& dir, LlamaForCausalLM& model);

/// Writes the model's attached adapters to `dir` (created if needed) as adapter_config.json
/// and adapter_model.safetensors, each through a temporary name.
void save_adapter(const std::string& dir,
                  const AdapterSpec& spec,
                  const AdapterSettings& settings,
                  LlamaForCausalLM& model,
                  const std::string& base_model);

/// The one place that decides what trains: adapter parameters train; the base's weights train
/// only with `base` (full fine-tuning), each once (a tied head is the embedding). Returns the
/// trainable tensors in model order.
std::vector<torch::Tensor> trainable_parameters(LlamaForCausalLM& model, bool base = false);

}  // namespace lorafit
