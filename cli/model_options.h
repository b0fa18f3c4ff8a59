// The options of commands that run a model (eval, generate), registered and used in one place.
#pragma once

#include <CLI/CLI.hpp>
#include <string>

#include "core/llama.h"

namespace lorafit::cli {

struct ModelOptions {
  std::string model;    // Hugging Face folder
  std::string adapter;  // optional adapter folder, applied unmerged
  std::string device = "auto";
  std::string dtype = "auto";
  std::string quantize = "none";
};

/// Registers --model, --adapter, --device, --dtype and --quantize on `cmd`.
void add_model_options(CLI::App* cmd, ModelOptions& o);

/// The base model on its device, with the adapter attached if one was given.
LlamaForCausalLM load_model(const ModelOptions& o);

}  // namespace lorafit::cli
