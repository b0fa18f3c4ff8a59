// `lorafit tokenize`: what the model's tokenizer makes of each record, as ids and tokens, so
// that users see what they train on. It reads only the folder's tokenizer files.
#include <fmt/core.h>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/text_data.h"
#include "tokenizer/tokenizer.h"

namespace lorafit::cli {

namespace {

struct TokenizeOptions {
  std::string model;
  std::string data = "-";
  bool no_special = false;
  bool json = false;
};

void run_tokenize(const TokenizeOptions& o) {
  const auto tokenizer = load_tokenizer(o.model);
  for (const auto& record : read_text_records(o.data)) {
    const auto ids = tokenizer.encode(record.text, !o.no_special);
    std::vector<std::string> tokens;
    for (const auto id : ids) tokens.push_back(tokenizer.token(id));
    if (o.json) {
      // Invalid UTF-8 in a token (a byte of a longer character) is written as U+FFFD.
      const nlohmann::json line = {{"ids", ids}, {"tokens", tokens}, {"text", record.text}};
      fmt::print("{}\n", line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
      continue;
    }
    std::string view;
    for (size_t i = 0; i < ids.size(); ++i)
      view += fmt::format(
          "{}{}:{}", i ? "  " : "", ids[i],
          nlohmann::json(tokens[i]).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
    fmt::print("{} ({} tokens)\n{}\n\n", record.where, ids.size(), view);
  }
}

}  // namespace

Action add_tokenize(CLI::App& app) {
  auto o = std::make_shared<TokenizeOptions>();
  auto* cmd = app.add_subcommand(
      "tokenize", "show a model's token ids and tokens for each record (no weights needed)");
  cmd->add_option("--model", o->model, "Hugging Face model folder (its tokenizer files)")
      ->required();
  cmd->add_option("--data", o->data, "text records: .jsonl with \"text\", .txt lines, - for stdin");
  cmd->add_flag("--no-special", o->no_special,
                "without the special tokens transformers' tokenizer(text) adds (BOS)");
  cmd->add_flag("--json", o->json, "one {\"ids\", \"tokens\", \"text\"} line per record");
  return [o] { run_tokenize(*o); };
}

}  // namespace lorafit::cli
