// libFuzzer target: a tokenizer.json (after the input's first newline) and a text (before it).
// Loading must refuse any bad file with an IoError; a file that loads must encode the text to
// ids of its vocabulary and decode them, never crash.
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/errors.h"
#include "tokenizer/bpe.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  const auto newline = input.find('\n');
  if (newline == std::string::npos) return 0;
  const auto text = input.substr(0, newline);
  try {
    const auto bpe = lorafit::ByteLevelBpe::parse(input.substr(newline + 1), "fuzz/tokenizer.json");
    for (const bool special : {false, true}) {
      const auto ids = bpe->encode(text, special);
      for (const auto id : ids)
        if (id < 0 || id >= bpe->vocab_size()) __builtin_trap();
      bpe->decode(ids);
    }
  } catch (const lorafit::IoError&) {
  }
  return 0;
}
