// lorafit's entry point and the one place where errors are caught: a lorafit::Error (a user
// mistake) exits 2, anything else exits 1, each with one `lorafit: error:` line on stderr; a
// run stopped by SIGINT or SIGTERM exits 128 + the signal after saying how to resume.
#include <c10/util/Exception.h>
#include <fmt/core.h>
#include <torch/cuda.h>
#include <torch/version.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <map>
#include <string>

#include "cli/commands.h"
#include "core/errors.h"

namespace {

// lorafit's version, the commit it was built from, and what it runs on.
std::string version_text() {
  const bool cuda = torch::cuda::is_available();
  return fmt::format("lorafit {} (commit {}), LibTorch {}, CUDA {}", LORAFIT_VERSION,
                     LORAFIT_GIT_COMMIT, TORCH_VERSION,
                     cuda ? fmt::format("yes ({} devices)", torch::cuda::device_count()) : "no");
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"lorafit: fine-tune LLaMA-family models with LoRA-family adapters"};
  app.require_subcommand(1);
  // Every option's help shows its default; subcommands copy this when they are added.
  app.option_defaults()->always_capture_default();
  app.set_version_flag("--version", std::function<std::string()>(version_text));
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
  add(lorafit::cli::add_tokenize);

  std::vector<std::string> known;
  for (const auto* sub : app.get_subcommands({})) known.push_back(sub->get_name());
  const std::string command = argc > 1 ? argv[1] : "";
  const bool is_command = std::count(known.begin(), known.end(), command) > 0;
  if (!command.empty() && command[0] != '-' && !is_command) {
    std::string list;
    for (const auto& k : known) list += (list.empty() ? "" : ", ") + k;
    fmt::print(stderr, "lorafit: error: unknown command '{}'{} (commands: {})\n", command,
               lorafit::did_you_mean(command, known), list);
    return 2;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    fmt::print(stderr, "lorafit: error: {} (see lorafit {}--help)\n", e.what(),
               is_command ? command + " " : "");
    return 2;
  }
  try {
    actions.at(app.get_subcommands().front())();
    return 0;
  } catch (const lorafit::Error& e) {
    fmt::print(stderr, "lorafit: error: {}\n", e.what());
    return e.exit_code();
  } catch (const lorafit::Interrupted& e) {
    fmt::print(stderr, "lorafit: {}\n", e.what());
    return 128 + e.signal;
  } catch (const c10::Error& e) {
    fmt::print(stderr, "lorafit: error: {}\n", e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "lorafit: error: {}\n", e.what());
    return 1;
  }
}
