// `lorafit tokenize`: what the model's tokenizer makes of each record, as ids and tokens, so
// that users see what they train on: for chat records, the rendering of the model's chat
// template and which tokens train. It reads only the folder's tokenizer files (and
// config.json's EOS, if it is there, for the llama2 chat format).
#include <fmt/core.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/datasets.h"
#include "core/errors.h"
#include "core/text_data.h"
#include "tokenizer/tokenizer.h"

namespace lorafit::cli {

namespace {

struct TokenizeOptions {
  std::string model;
  std::string data = "-";
  std::string format = "text";
  std::string chat_template = "model";
  std::string template_kwargs;
  bool add_generation_prompt = false;
  bool no_special = false;
  bool json = false;
};

std::string json_quoted(const std::string& s) {
  // Invalid UTF-8 in a token (a byte of a longer character) is written as U+FFFD.
  return nlohmann::json(s).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

void run_tokenize(const TokenizeOptions& o) {
  const auto tokenizer = load_tokenizer(o.model);
  DatasetOptions chat;
  nlohmann::ordered_json kwargs;
  if (o.format == "chat") {
    // Without config.json the defaults stand in (EOS 2, LLaMA's), as the llama2 format needs one.
    LlamaConfig config;
    if (std::filesystem::exists(std::filesystem::path(o.model) / "config.json"))
      config = load_llama_config(o.model);
    chat = dataset_options(tokenizer, config, "chat", 0, Packing::Pad, o.chat_template);
    chat.add_generation_prompt = o.add_generation_prompt;
    if (!o.template_kwargs.empty()) {
      try {
        kwargs = nlohmann::ordered_json::parse(o.template_kwargs);
      } catch (const nlohmann::json::exception& e) {
        throw ConfigError("--chat-template-kwargs is not JSON: " + std::string(e.what()));
      }
      if (!kwargs.is_object()) throw ConfigError("--chat-template-kwargs must be a JSON object");
    }
  }
  std::vector<JsonRecord> records;
  if (o.format == "chat") {
    records = read_json_records(o.data);
  } else {
    for (auto& r : read_text_records(o.data))
      records.push_back({nlohmann::ordered_json{{"text", r.text}}, r.where});
  }
  for (auto& record : records) {
    std::vector<int64_t> ids;
    std::vector<bool> trained;
    std::string text;
    if (o.format == "chat") {
      if (!kwargs.is_null() && record.value.is_object() &&
          !record.value.contains("chat_template_kwargs"))
        record.value["chat_template_kwargs"] = kwargs;
      const auto ex = chat_example(record, tokenizer, chat, &text);
      ids = ex.input_ids;
      for (const auto l : ex.labels) trained.push_back(l != kIgnoreLabel);
    } else {
      text = record.value["text"].get<std::string>();
      ids = tokenizer.encode(text, !o.no_special);
    }
    std::vector<std::string> tokens;
    for (const auto id : ids) tokens.push_back(tokenizer.token(id));
    if (o.json) {
      nlohmann::json line = {{"ids", ids}, {"tokens", tokens}, {"text", text}};
      if (o.format == "chat") {
        std::vector<int> mask(trained.begin(), trained.end());
        line["labels_mask"] = mask;
      }
      fmt::print("{}\n", line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
      continue;
    }
    // Readable: each token as id:"token"; the tokens that train are marked with a *.
    std::string view;
    size_t count = 0;
    for (size_t i = 0; i < ids.size(); ++i) {
      const bool t = !trained.empty() && trained[i];
      count += t;
      view += fmt::format("{}{}{}:{}", i ? "  " : "", t ? "*" : "", ids[i], json_quoted(tokens[i]));
    }
    const std::string trains =
        o.format == "chat" ? fmt::format(", {} trained, marked *", count) : std::string();
    if (o.format == "chat") fmt::print("{}\n{}\n", record.where, text);
    fmt::print("{} ({} tokens{})\n{}\n\n", o.format == "chat" ? "tokens" : record.where, ids.size(),
               trains, view);
  }
}

}  // namespace

Action add_tokenize(CLI::App& app) {
  auto o = std::make_shared<TokenizeOptions>();
  auto* cmd = app.add_subcommand(
      "tokenize", "show a model's token ids and tokens for each record (no weights needed)");
  cmd->add_option("--model", o->model, "Hugging Face model folder (its tokenizer files)")
      ->required();
  cmd->add_option("--data", o->data,
                  "records: .jsonl with \"text\" (or \"messages\" for chat), .txt lines, - for "
                  "stdin");
  cmd->add_option("--format", o->format,
                  "text, or chat: render {\"messages\"} with the model's chat template")
      ->check(CLI::IsMember({"text", "chat"}));
  cmd->add_option("--chat-template", o->chat_template,
                  "chat: model (its tokenizer_config.json's), llama2, or a Jinja template file");
  cmd->add_option("--chat-template-kwargs", o->template_kwargs,
                  "chat: extra template variables as a JSON object, e.g. "
                  "'{\"enable_thinking\": false}' (a record's own chat_template_kwargs win)");
  cmd->add_flag("--add-generation-prompt", o->add_generation_prompt,
                "chat: end with the prompt for the assistant's next turn");
  cmd->add_flag("--no-special", o->no_special,
                "text: without the special tokens transformers' tokenizer(text) adds (BOS)");
  cmd->add_flag("--json", o->json,
                "one {\"ids\", \"tokens\", \"text\"} line per record (chat adds \"labels_mask\")");
  return [o] { run_tokenize(*o); };
}

}  // namespace lorafit::cli
