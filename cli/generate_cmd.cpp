// `lorafit generate`: continue a prompt, with or without an adapter.
#include <fmt/core.h>

#include <iostream>
#include <iterator>

#include "cli/commands.h"
#include "cli/model_options.h"
#include "core/errors.h"
#include "core/generate.h"
#include "tokenizer/tokenizer.h"

namespace lorafit::cli {

namespace {

struct GenerateCmd {
  ModelOptions model;
  std::string prompt;
  GenerateOptions options;
};

void run_generate(const GenerateCmd& o) {
  std::string prompt = o.prompt;
  if (prompt == "-") prompt.assign(std::istreambuf_iterator<char>(std::cin), {});
  const auto tokenizer = load_tokenizer(o.model.model);
  auto model = load_model(o.model);
  // As transformers' tokenizer(prompt): with the tokenizer's special prefix (BOS).
  const auto ids = tokenizer.encode(prompt, /*add_special_tokens=*/true);
  if (ids.empty()) {
    throw ConfigError("--prompt is empty and the tokenizer '" + tokenizer.path() +
                      "' puts no BOS before a text: there is nothing to continue (hint: give a "
                      "prompt)");
  }
  const auto out = generate(model, ids, o.options);
  fmt::print("{}\n", tokenizer.decode(out));
}

}  // namespace

Action add_generate(CLI::App& app) {
  auto o = std::make_shared<GenerateCmd>();
  auto* cmd = app.add_subcommand("generate", "continue a prompt (KV cache; greedy or sampled)");
  add_model_options(cmd, o->model);
  cmd->add_option("--prompt", o->prompt, "prompt text, or - to read standard input")->required();
  cmd->add_option("--max-new-tokens", o->options.max_new_tokens, "stop after N new tokens")
      ->check(in_range(1));
  cmd->add_option("--temperature", o->options.temperature, "0 for greedy decoding")
      ->check(in_range(0, 100));
  cmd->add_option("--top-p", o->options.top_p, "nucleus sampling threshold")->check(in_range(0, 1));
  cmd->add_option("--seed", o->options.seed, "sampling seed");
  return [o] { run_generate(*o); };
}

}  // namespace lorafit::cli
