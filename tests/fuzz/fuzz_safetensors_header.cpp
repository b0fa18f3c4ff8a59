// libFuzzer target: the safetensors header parser must refuse any byte string with an IoError,
// never crash or read out of bounds. The input is the whole file.
#include <cstddef>
#include <cstdint>

#include "core/errors.h"
#include "core/safetensors_format.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const auto h = lorafit::parse_st_header(data, size, size, "fuzz.safetensors");
    // Every accepted entry must lie inside the input.
    for (const auto& e : h.entries) {
      if (h.data_start + e.end > size) __builtin_trap();
    }
  } catch (const lorafit::IoError&) {
  }
  return 0;
}
