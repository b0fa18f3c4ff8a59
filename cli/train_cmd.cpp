// `lorafit train` and `lorafit validate`: both read a recipe with --set overrides; validate
// stops after the checks, train runs it.
#include <fmt/core.h>

#include "cli/commands.h"
#include "core/distributed.h"
#include "core/recipe.h"
#include "core/trainer.h"

namespace lorafit::cli {

namespace {

struct TrainOptions {
  std::string recipe;
  std::vector<std::string> overrides;
  std::string resume;
  std::string device;
};

Recipe resolved(const TrainOptions& o) {
  auto overrides = o.overrides;
  if (!o.device.empty()) overrides.push_back("device=" + o.device);
  return load_recipe(o.recipe, overrides);
}

void add_recipe_options(CLI::App* cmd, TrainOptions& o) {
  cmd->add_option("recipe", o.recipe, "YAML recipe (- for standard input)")->required();
  cmd->add_option("--set", o.overrides, "override a recipe key: --set data.max_seq_len=1024");
}

}  // namespace

Action add_train(CLI::App& app) {
  auto o = std::make_shared<TrainOptions>();
  auto* cmd = app.add_subcommand("train", "train an adapter as a recipe says");
  add_recipe_options(cmd, *o);
  cmd->add_option("--resume", o->resume, "OUTPUT folder or checkpoint to resume from");
  cmd->add_option("--device", o->device, "auto | cpu | cuda (overrides the recipe)")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  return [o] {
    const Recipe recipe = resolved(*o);
    if (launch_from_env().rank == 0) fmt::print(stderr, "{}", recipe_to_yaml(recipe));
    train(recipe, {o->recipe, o->resume});
  };
}

Action add_validate(CLI::App& app) {
  auto o = std::make_shared<TrainOptions>();
  auto* cmd = app.add_subcommand("validate", "check a recipe without loading weights");
  add_recipe_options(cmd, *o);
  return [o] {
    fmt::print("{}", recipe_to_yaml(resolved(*o)));
    fmt::print(stderr, "recipe '{}' is valid\n", o->recipe);
  };
}

}  // namespace lorafit::cli
