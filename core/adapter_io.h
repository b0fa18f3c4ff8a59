// Saved adapters on disk: a folder with adapter_config.json and adapter_model.safetensors.
#pragma once

#include <string>

#include "core/llama.h"

namespace lorafit {

/// Reads the adapter in `dir` and attaches it to `model`'s projections through the strategy
/// that its peft_type names. Every mismatch with the model is reported at once.
void load_adapter(const std::string& dir, LlamaForCausalLM& model);

}  // namespace lorafit
