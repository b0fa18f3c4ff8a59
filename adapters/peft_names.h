// Names that the model, the strategies and PEFT's on-disk format share. Free of LibTorch.
#pragma once

#include <string>
#include <vector>

namespace lorafit {

/// What PEFT puts before a module's name in every saved tensor key:
/// base_model.model.<module>.lora_A.weight.
inline const std::string kPeftPrefix = "base_model.model.";

/// The projections of a LLaMA-family layer, in model order: the modules adapters target.
inline const std::vector<std::string> kProjectionKinds = {
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};

}  // namespace lorafit
