// lorafit's entry point and the one place where errors are caught: a lorafit::Error (a user
// mistake) exits 2, anything else exits 1, each with one `lorafit: error:` line on stderr.
#include <c10/util/Exception.h>
#include <fmt/core.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <map>
#include <string>

#include "cli/commands.h"
#include "core/errors.h"

int main(int argc, char** argv) {
  CLI::App app{"lorafit: fine-tune LLaMA-family models with LoRA-family adapters"};
  app.require_subcommand(1);
  std::map<CLI::App*, lorafit::cli::Action> actions;
  auto add = [&](lorafit::cli::Action (*make)(CLI::App&)) {
    auto action = make(app);
    actions[app.get_subcommands({}).back()] = std::move(action);
  };
  add(lorafit::cli::add_train);
  add(lorafit::cli::add_validate);
  add(lorafit::cli::add_eval);
  add(lorafit::cli::add_merge);
  add(lorafit::cli::add_init);
  add(lorafit::cli::add_generate);
  add(lorafit::cli::add_bench);

  std::string known;
  bool is_command = false;
  for (const auto* sub : app.get_subcommands({})) {
    known += (known.empty() ? "" : ", ") + sub->get_name();
    is_command = is_command || (argc > 1 && sub->get_name() == argv[1]);
  }
  if (argc > 1 && argv[1][0] != '-' && !is_command) {
    fmt::print(stderr, "lorafit: error: unknown command '{}' (commands: {})\n", argv[1], known);
    return 2;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    fmt::print(stderr, "lorafit: error: {} (see lorafit --help)\n", e.what());
    return 2;
  }
  try {
    actions.at(app.get_subcommands().front())();
    return 0;
  } catch (const lorafit::Error& e) {
    fmt::print(stderr, "lorafit: error: {}\n", e.what());
    return 2;
  } catch (const c10::Error& e) {
    fmt::print(stderr, "lorafit: error: {}\n", e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "lorafit: error: {}\n", e.what());
    return 1;
  }
}
