// libFuzzer target: the input is a chat template, parsed and rendered with a conversation that
// has every kind of message templates see (system, user, assistant with reasoning and tool
// calls, tool) and tools. Parsing and rendering must refuse any bad template with a
// TemplateError, within the interpreter's bounds, and never crash.
#include <cstddef>
#include <cstdint>
#include <string>

#include "tokenizer/jinja.h"

namespace {

const nlohmann::ordered_json& context() {
  static const auto ctx = nlohmann::ordered_json::parse(R"({
    "messages": [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "Hi \u65e5\u672c <|im_end|>"},
      {"role": "assistant", "content": "<think>\nx\n</think>\n\nHello", "tool_calls": [
        {"type": "function", "id": "abcdefghi",
         "function": {"name": "f", "arguments": {"city": "Paris", "n": 1.5}}}]},
      {"role": "tool", "content": "sunny", "tool_call_id": "abcdefghi"},
      {"role": "user", "content": ""}],
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "add_generation_prompt": true, "enable_thinking": false,
    "bos_token": "<s>", "eos_token": "</s>", "documents": null})");
  return ctx;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string source(reinterpret_cast<const char*>(data), size);
  try {
    const lorafit::jinja::Template t(source, "fuzz.jinja");
    t.render(context());
  } catch (const lorafit::jinja::TemplateError&) {
  }
  return 0;
}
