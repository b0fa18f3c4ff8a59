#include "tokenizer/chat.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/errors.h"
#include "tokenizer/jinja.h"
#include "tokenizer/tokenizer.h"

namespace lorafit {

namespace {

namespace fs = std::filesystem;
using nlohmann::ordered_json;

const char* const kHint =
    " (hint: set data.chat_template, or --chat-template, to a Jinja template file that lorafit "
    "can render, or to llama2)";

std::string read_file(const std::string& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError("cannot read " + what + " '" + path + "'");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A special token of tokenizer_config.json as its text: a string or {"content": ...}.
ordered_json token_text(const ordered_json& config, const char* key) {
  auto it = config.find(key);
  if (it == config.end()) return nullptr;
  if (it->is_string()) return *it;
  if (it->is_object() && it->contains("content") && (*it)["content"].is_string())
    return (*it)["content"];
  return nullptr;
}

jinja::Template parse_template(const std::string& source, const std::string& name) {
  try {
    return jinja::Template(source, name);
  } catch (const jinja::TemplateError& e) {
    throw jinja::TemplateError(e.what() + std::string(kHint));
  }
}

// How many leading elements (characters, token ids) two sequences share.
template <class Seq>
size_t common_prefix(const Seq& a, const Seq& b) {
  const auto n = std::min(a.size(), b.size());
  return static_cast<size_t>(std::mismatch(a.begin(), a.begin() + n, b.begin()).first - a.begin());
}

}  // namespace

ChatTemplate load_chat_template(const std::string& model_dir, const std::string& choice) {
  ChatTemplate t;
  const auto config_path = (fs::path(model_dir) / "tokenizer_config.json").string();
  ordered_json config = ordered_json::object();
  if (fs::exists(config_path)) {
    try {
      config = ordered_json::parse(read_file(config_path, "tokenizer config"));
    } catch (const ordered_json::exception& e) {
      throw IoError("tokenizer config '" + config_path + "' is not valid JSON: " + e.what());
    }
    if (!config.is_object())
      throw IoError("tokenizer config '" + config_path + "' is not a JSON object");
  }
  t.special = ordered_json::object();
  for (const char* key : {"bos_token", "eos_token", "unk_token", "pad_token"})
    t.special[key] = token_text(config, key);
  if (choice == "llama2") {
    t.name = "lorafit's llama2 chat format";
    return t;
  }
  std::string source;
  if (!choice.empty() && choice != "model") {
    t.name = "chat template '" + choice + "'";
    source = read_file(choice, "chat template");
  } else {
    auto it = config.find("chat_template");
    if (it == config.end() || it->is_null()) {
      t.name = "lorafit's llama2 chat format";
      return t;
    }
    t.name = "the chat_template of '" + config_path + "'";
    if (it->is_array()) {  // named templates: the default one
      for (const auto& named : *it)
        if (named.is_object() && named.value("name", "") == "default" &&
            named.contains("template") && named["template"].is_string())
          source = named["template"].get<std::string>();
      if (source.empty())
        throw IoError(t.name + " lists named templates but none named 'default'" + kHint);
    } else if (it->is_string()) {
      source = it->get<std::string>();
    } else {
      throw IoError(t.name + " must be a string, got " + it->dump());
    }
  }
  t.jinja = std::make_shared<jinja::Template>(parse_template(source, t.name));
  return t;
}

ChatTokens render_chat(const ChatTemplate& chat,
                       const Tokenizer& tokenizer,
                       const ordered_json& messages,
                       bool add_generation_prompt,
                       const ordered_json& variables,
                       const std::string& where) {
  if (!chat.jinja) throw std::logic_error("render_chat needs a Jinja template");
  if (fs::path(tokenizer.path()).filename() != "tokenizer.json") {
    throw IoError(where + ": " + chat.name +
                  " needs the model's tokenizer.json, whose special "
                  "tokens the template writes as text; '" +
                  tokenizer.path() + "' is sentencepiece (hint: data.chat_template: llama2)");
  }
  auto render = [&](size_t count, bool generation_prompt) {
    // What transformers passes: the messages, tools and documents (None unless given), the
    // generation flag, the special tokens, then the caller's variables.
    ordered_json ctx = chat.special;
    ctx["messages"] = ordered_json::array();
    for (size_t k = 0; k < count; ++k) ctx["messages"].push_back(messages[k]);
    ctx["tools"] = nullptr;
    ctx["documents"] = nullptr;
    ctx["add_generation_prompt"] = generation_prompt;
    if (variables.is_object())
      for (const auto& [k, v] : variables.items()) ctx[k] = v;
    try {
      return chat.jinja->render(ctx);
    } catch (const jinja::TemplateError& e) {
      const std::string what = e.what();
      const bool raised = what.find(": raise_exception: ") != std::string::npos;
      throw jinja::TemplateError(where + ": " + what +
                                 (raised ? " (the template rejects this conversation)" : kHint));
    }
  };
  ChatTokens out;
  out.text = render(messages.size(), add_generation_prompt);
  out.ids = tokenizer.encode(out.text, /*add_special_tokens=*/false);
  out.trained.assign(out.ids.size(), false);
  for (size_t i = 0; i < messages.size(); ++i) {
    if (!messages[i].is_object() || messages[i].value("role", "") != "assistant") continue;
    // A template may refuse to render no messages at all; then nothing comes before the turn.
    std::string before;
    if (i > 0) {
      before = render(i, true);
    } else {
      try {
        before = render(0, true);
      } catch (const jinja::TemplateError&) {
      }
    }
    const std::string upto = render(i + 1, false);
    const size_t start = common_prefix(before, out.text);
    const std::string turn = upto.substr(common_prefix(before, upto));
    // The longest end of `turn` that the full text continues with at `start`: all of it for a
    // template that renders each turn the same whatever follows.
    size_t length = std::min(turn.size(), out.text.size() - start);
    if (out.text.compare(start, turn.size(), turn) != 0) {
      for (; length > 0; --length)
        if (out.text.compare(start, length, turn, turn.size() - length, length) == 0) break;
    }
    if (length == 0) continue;
    // Token boundaries: how far the tokens of the text up to each end agree with the full
    // text's tokens (a token across the boundary belongs to neither side).
    const size_t a = common_prefix(tokenizer.encode(out.text.substr(0, start), false), out.ids);
    const size_t b =
        common_prefix(tokenizer.encode(out.text.substr(0, start + length), false), out.ids);
    for (size_t k = a; k < b; ++k) out.trained[k] = true;
  }
  return out;
}

}  // namespace lorafit
