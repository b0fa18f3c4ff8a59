// One function per subcommand: each registers its options on the CLI11 app and returns the
// action to run once parsing succeeded. Actions throw; cli/main.cpp catches.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>

namespace lorafit::cli {

using Action = std::function<void()>;

Action add_train(CLI::App& app);
Action add_validate(CLI::App& app);
Action add_eval(CLI::App& app);
Action add_merge(CLI::App& app);
Action add_init(CLI::App& app);
Action add_generate(CLI::App& app);
Action add_bench(CLI::App& app);

}  // namespace lorafit::cli
