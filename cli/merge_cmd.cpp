// `lorafit merge` (an adapter folded into its base) and `lorafit init` (a new model with
// random weights): each writes a Hugging Face checkpoint.
#include <fmt/core.h>

#include "cli/commands.h"
#include "core/merge.h"

namespace lorafit::cli {

Action add_merge(CLI::App& app) {
  auto o = std::make_shared<MergeOptions>();
  auto* cmd = app.add_subcommand("merge", "fold an adapter into its base model");
  cmd->add_option("--model", o->model, "Hugging Face base model folder")->required();
  cmd->add_option("--adapter", o->adapter, "adapter folder")->required();
  cmd->add_option("--out", o->out, "new model folder (must not exist)")->required();
  cmd->add_option("--dtype", o->dtype, "bf16 | f16 | f32 (default: the base checkpoint's)")
      ->check(CLI::IsMember({"auto", "bf16", "f16", "f32"}));
  return [o] {
    merge_adapter(*o);
    fmt::print(stderr, "merged model written to {}\n", o->out);
  };
}

Action add_init(CLI::App& app) {
  auto o = std::make_shared<InitOptions>();
  auto* cmd = app.add_subcommand(
      "init", "a new model with random weights, to train from scratch with adapter.type full");
  cmd->add_option("--from", o->from,
                  "folder with config.json and tokenizer.json or tokenizer.model")
      ->required();
  cmd->add_option("--out", o->out, "new model folder (must not exist)")->required();
  cmd->add_option("--seed", o->seed, "seed of the random weights (default 0)");
  return [o] {
    init_model(*o);
    fmt::print(stderr, "new model written to {}\n", o->out);
  };
}

}  // namespace lorafit::cli
