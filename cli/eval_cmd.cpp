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
  int64_t max_seq_len = 0;  // 0: the model's max_position_embeddings
  int64_t batch_size = 8;
  bool json = false;
};

void run_eval(const EvalOptions& o) {
  const auto records = read_text_records(o.data);
  auto model = load_model(o.model);
  const auto tokenizer = load_tokenizer(o.model.model);
  const auto max_len = o.max_seq_len > 0 ? o.max_seq_len : model->config.max_position_embeddings;
  const auto seqs = eval_sequences(records, tokenizer, model->config.bos_token_id, max_len);
  const auto result = evaluate(model, seqs, o.batch_size);
  if (result.tokens == 0) {
    throw Error("dataset '" + o.data +
                "' has no token to score (every record is empty, or "
                "--max-seq-len is 1)");
  }
  if (o.json) {
    nlohmann::json j = {
        {"loss", result.loss}, {"perplexity", result.perplexity()}, {"tokens", result.tokens}};
    fmt::print("{}\n", j.dump());
  } else {
    fmt::print("loss {:.6f}  perplexity {:.4f}  tokens {}\n", result.loss, result.perplexity(),
               result.tokens);
  }
}

}  // namespace

Action add_eval(CLI::App& app) {
  auto o = std::make_shared<EvalOptions>();
  auto* cmd = app.add_subcommand("eval", "loss and perplexity of a model on a text dataset");
  add_model_options(cmd, o->model);
  cmd->add_option("--data", o->data, "text dataset (.jsonl, .json, .txt, or - for stdin)")
      ->required();
  cmd->add_option("--max-seq-len", o->max_seq_len, "cut each record to N tokens (with BOS)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--batch-size", o->batch_size, "records per forward pass")
      ->check(CLI::PositiveNumber);
  cmd->add_flag("--json", o->json, "print {\"loss\", \"perplexity\", \"tokens\"} as JSON");
  return [o] { run_eval(*o); };
}

}  // namespace lorafit::cli
