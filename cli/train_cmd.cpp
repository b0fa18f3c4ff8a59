// `lorafit train` and `lorafit validate`: both read a recipe with overrides (--set KEY=VALUE,
// or KEY=VALUE after the recipe as torchtune takes them); validate stops after the checks and
// a read of the data, train runs it.
#include <fmt/core.h>

#include "cli/commands.h"
#include "core/distributed.h"
#include "core/errors.h"
#include "core/recipe.h"
#include "core/trainer.h"

namespace lorafit::cli {

namespace {

struct TrainOptions {
  std::string recipe;
  std::vector<std::string> overrides;
  std::vector<std::string> bare;  // KEY=VALUE after the recipe
  std::string resume;
  std::string device;
  bool overwrite = false;
};

Recipe resolved(const TrainOptions& o) {
  auto overrides = o.overrides;
  for (const auto& b : o.bare) {
    if (b.find('=') == std::string::npos || b.front() == '=') {
      throw ConfigError("unexpected argument '" + b +
                        "' after the recipe (hint: overrides look like train.steps=10)");
    }
    overrides.push_back(b);
  }
  if (!o.device.empty()) overrides.push_back("device=" + o.device);
  return load_recipe(o.recipe, overrides);
}

void add_recipe_options(CLI::App* cmd, TrainOptions& o) {
  cmd->add_option("recipe", o.recipe, "YAML recipe (- for standard input)")->required();
  cmd->add_option("overrides", o.bare, "KEY=VALUE overrides, as --set takes them");
  cmd->add_option("--set", o.overrides, "override a recipe key: --set data.max_seq_len=1024");
}

}  // namespace

Action add_train(CLI::App& app) {
  auto o = std::make_shared<TrainOptions>();
  auto* cmd = app.add_subcommand("train", "train an adapter as a recipe says");
  add_recipe_options(cmd, *o);
  cmd->add_option("--resume", o->resume, "OUTPUT folder or checkpoint to resume from");
  cmd->add_flag("--overwrite", o->overwrite,
                "replace what the output folder holds (an earlier run) instead of refusing");
  cmd->add_option("--device", o->device, "auto | cpu | cuda (overrides the recipe)")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  return [o] {
    const Recipe recipe = resolved(*o);
    if (launch_from_env().rank == 0) fmt::print(stderr, "{}", recipe_to_yaml(recipe));
    train(recipe, {o->recipe, o->resume, o->overwrite});
  };
}

Action add_validate(CLI::App& app) {
  auto o = std::make_shared<TrainOptions>();
  auto* cmd =
      app.add_subcommand("validate", "check a recipe and read its data without loading weights");
  add_recipe_options(cmd, *o);
  return [o] {
    const Recipe recipe = resolved(*o);
    fmt::print("{}", recipe_to_yaml(recipe));
    std::vector<std::string> warnings;
    for (const auto& line : describe_data(recipe, warnings)) fmt::print(stderr, "{}\n", line);
    for (const auto& w : warnings) fmt::print(stderr, "lorafit: {}\n", w);
    fmt::print(stderr, "recipe '{}' is valid\n", o->recipe);
  };
}

}  // namespace lorafit::cli
