// Chat records as the model's own chat template renders them (transformers'
// apply_chat_template), with the assistant turns found by rendering the conversation's
// prefixes, the approach TRL and torchtune take, so that the loss masks follow any template.
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace lorafit {

namespace jinja {
class Template;
}
class Tokenizer;

struct ChatTemplate {
  std::string name;  // what messages call it: the file, or "the chat_template of ..."
  std::shared_ptr<const jinja::Template> jinja;  // null: lorafit's built-in llama2 turn format
  nlohmann::ordered_json special;  // bos_token, eos_token, unk_token, pad_token as strings
};

/// The template for a model folder. `choice` "model" (or "") takes tokenizer_config.json's
/// chat_template (a folder without one gets llama2), "llama2" the built-in LLaMA-2 [INST]
/// format, anything else a Jinja template file. A template that does not parse is an Error naming
/// it, with the hint to set data.chat_template.
ChatTemplate load_chat_template(const std::string& model_dir, const std::string& choice);

struct ChatTokens {
  std::string text;           // the rendering
  std::vector<int64_t> ids;   // its tokens, as apply_chat_template gives them
  std::vector<bool> trained;  // per id: inside an assistant turn
};

/// Renders `messages` (a list of {"role", "content", ...}) with a Jinja template and
/// tokenizes the text without added special tokens, as apply_chat_template does. Each
/// assistant turn is the text between the rendering of the messages before it with the
/// generation prompt and the rendering up to and including it; where a template renders
/// earlier turns differently once later ones follow (Qwen3 drops past reasoning), the turn is
/// the longest end of that rendering that the full text continues with. `variables` are extra
/// template variables (enable_thinking); `where` names the record in messages.
ChatTokens render_chat(const ChatTemplate& chat,
                       const Tokenizer& tokenizer,
                       const nlohmann::ordered_json& messages,
                       bool add_generation_prompt,
                       const nlohmann::ordered_json& variables,
                       const std::string& where);

}  // namespace lorafit
