// Folding an adapter into its base: a Hugging Face checkpoint that transformers loads.
#pragma once

#include <string>

namespace lorafit {

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
