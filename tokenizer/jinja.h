// A small Jinja interpreter for chat templates, rendering as transformers' apply_chat_template
// does: jinja2's sandboxed environment with trim_blocks and lstrip_blocks, the loopcontrols
// extension ({% break %}, {% continue %}), transformers' {% generation %} block, its
// raise_exception and strftime_now globals and its tojson filter (no HTML escaping, key order
// kept). It covers what model templates use: for/if/set/macro, namespace(), loop variables,
// filters, tests, Python string and dict methods, slicing, whitespace control. Anything else
// is a TemplateError naming the construct and its line. Free of LibTorch.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "core/errors.h"

namespace lorafit::jinja {

/// A template that does not parse, or that fails while rendering (raise_exception, an
/// unsupported construct, a type error); the message names the template and the line.
struct TemplateError : Error {
  using Error::Error;
};

struct Node;

class Template {
 public:
  /// Parses `source`; `name` stands for the template in messages (a file or "the chat_template
  /// of tokenizer_config.json").
  Template(const std::string& source, const std::string& name);
  ~Template();
  Template(Template&&) noexcept;

  /// Renders with the top-level variables of `context` (an object). The rendering is bounded:
  /// a template that would loop or recurse without end, or write more than 64 MiB, is refused.
  std::string render(const nlohmann::ordered_json& context) const;

 private:
  std::string name_;
  std::shared_ptr<const Node> root_;
};

}  // namespace lorafit::jinja
