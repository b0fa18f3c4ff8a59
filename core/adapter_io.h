// Saved adapters on disk: a folder with adapter_config.json and adapter_model.safetensors
// (or adapter_model.bin, as m-LoRA, MoE-PEFT and PEFT before safetensors write it).
#pragma once

#include <functional>
#include <string>

#include "adapters/strategy.h"
#include "core/llama.h"

namespace lorafit {

/// adapter_config.json (with a peft_type) and the floating-point tensors of
/// adapter_model.safetensors in `dir`, or else of adapter_model.bin; LongLoRA's
/// trainable_params.bin beside them becomes modules_to_save. An IoError or ConfigError naming
/// the file otherwise.
SavedAdapter read_adapter_files(const std::string& dir);

/// Writes adapter_config.json and adapter_model.safetensors (and adapter_model.bin when the
/// strategy asks for it) into `dir` (created if needed), each through a temporary name.
void write_adapter_files(const std::string& dir, const SavedAdapter& saved);

/// Reads the adapter in `dir` and attaches it (with its modules_to_save, and its RoPE
/// interpolation when it was trained with one) to `model`'s projections through the strategy
/// that reads its adapter_config.json, which it returns. Every mismatch with the model is
/// reported at once.
const AdapterSpec& load_adapter(const std::string& dir, LlamaForCausalLM& model);

/// Which base tensors train besides the adapters, by checkpoint name (full fine-tuning: all;
/// LongLoRA: embeddings and norms); empty: none.
using BaseFilter = std::function<bool(const std::string& name)>;

/// Full fine-tuning's filter: every base tensor.
inline bool every_base_tensor(const std::string&) {
  return true;
}

/// The one place that decides what trains: the base tensors that `base` accepts, each once
/// (a tied head is the embedding's tensor), in model order, then the parameters of the
/// adapters attached at `sites` (one job's); every other model tensor is frozen.
std::vector<torch::Tensor> trainable_parameters(LlamaForCausalLM& model,
                                                const AdapterSites& sites,
                                                const BaseFilter& base = {});

/// trainable_parameters with the model's own adapter sites.
std::vector<torch::Tensor> trainable_parameters(LlamaForCausalLM& model,
                                                const BaseFilter& base = {});

/// Adds trained base tensors (checkpoint name, tensor) to a saved adapter in PEFT's
/// modules_to_save convention: keys base_model.model.<checkpoint name> in fp32, and the
/// modules' names listed under modules_to_save in the config. Nothing when `base` is empty.
void add_modules_to_save(SavedAdapter& saved,
                         const std::vector<std::pair<std::string, torch::Tensor>>& base);

/// The adapter_config.json entry of an adapter trained with linear RoPE interpolation
/// (LongLoRA): {"rope_type": "linear", "factor": f}, transformers' rope_scaling spelling.
nlohmann::json linear_rope_scaling(double factor);

/// Moves a saved adapter's modules_to_save tensors into the model's base weights (untying a
/// tied head first when the embedding is among them) and out of `saved`, so that the
/// strategy reads only its own tensors.
void apply_modules_to_save(SavedAdapter& saved, LlamaForCausalLM& model, const std::string& where);

}  // namespace lorafit
