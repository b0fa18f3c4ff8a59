// `lorafit eval`: held-out loss and perplexity of a model, with or without an adapter.
#include <fmt/core.h>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/model_options.h"
#include "core/errors.h"
#include "core/eval.h"

namespace lorafit::cli {

namespace {

struct EvalOptions {
  ModelOptions model;
  std::string data;
  std::string format = "text";
  std::string chat_template = "model";
  int64_t max_seq_len = 0;  // 0: the model's max_position_embeddings (or its window)
  int64_t batch_size = 8;
  bool packing = false;
  bool json = false;
};

void run_eval(const EvalOptions& o) {
  auto model = load_model(o.model);
  const auto tokenizer = load_tokenizer(o.model.model);
  const auto& c = model->config;
  const auto max_len = o.max_seq_len > 0 ? o.max_seq_len
                       : c.sliding_window > 0
                           ? std::min(c.max_position_embeddings, c.sliding_window)
                           : c.max_position_embeddings;
  const auto examples =
      eval_examples(o.data, tokenizer, o.format, model->config, max_len, o.chat_template);
  const auto result = evaluate(model, examples, o.batch_size, o.packing);
  if (result.tokens == 0) {
    throw Error("dataset '" + o.data +
                "' has no token to score (every record is empty, its responses were cut "
                "off, or --max-seq-len is 1)");
  }
  if (o.json) {
    nlohmann::json j = {{"loss", result.loss},
                        {"perplexity", result.perplexity()},
                        {"tokens", result.tokens},
                        {"accuracy", result.accuracy()},
                        {"records", result.records}};
    fmt::print("{}\n", j.dump());
  } else {
    fmt::print("loss {:.6f}  perplexity {:.4f}  tokens {}  exact match {}/{} ({:.2f}%)\n",
               result.loss, result.perplexity(), result.tokens, result.exact, result.records,
               100.0 * result.accuracy());
  }
}

}  // namespace

Action add_eval(CLI::App& app) {
  auto o = std::make_shared<EvalOptions>();
  auto* cmd = app.add_subcommand(
      "eval", "loss, perplexity and exact-match accuracy of a model on a dataset");
  add_model_options(cmd, o->model);
  cmd->add_option("--data", o->data, "dataset (.jsonl, .json, .txt, or - for stdin)")->required();
  cmd->add_option("--format", o->format,
                  "text: every token after BOS scored; alpaca, chat, tokens: only the "
                  "responses, as training reads them")
      ->check(CLI::IsMember({"text", "alpaca", "chat", "tokens"}));
  cmd->add_option("--chat-template", o->chat_template,
                  "chat: model (its tokenizer_config.json's), llama2, or a Jinja template file");
  cmd->add_option("--max-seq-len", o->max_seq_len, "cut each record to N tokens (with BOS)")
      ->check(in_range(1));
  cmd->add_option("--batch-size", o->batch_size, "rows per forward pass")->check(in_range(1));
  cmd->add_flag("--packing", o->packing,
                "pack records into rows as long as the longest, each seeing itself only: "
                "the same loss in fewer forward passes");
  cmd->add_flag("--json", o->json,
                "print {\"loss\", \"perplexity\", \"tokens\", \"accuracy\", \"records\"} as JSON");
  return [o] { run_eval(*o); };
}

}  // namespace lorafit::cli
