// libFuzzer target: config.json parsing must refuse any text with a ConfigError, never crash.
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/errors.h"
#include "core/hf_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const auto c = lorafit::parse_llama_config(
        std::string(reinterpret_cast<const char*>(data), size), "fuzz/config.json");
    if (c.head_dim <= 0 || c.num_attention_heads % c.num_key_value_heads != 0) __builtin_trap();
  } catch (const lorafit::ConfigError&) {
  }
  return 0;
}
