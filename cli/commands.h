// One function per subcommand: each registers its options on the CLI11 app and returns the
// action to run once parsing succeeded. Actions throw; cli/main.cpp catches.
#pragma once

#include <CLI/CLI.hpp>
#include <cmath>
#include <functional>
#include <limits>
#include <string>

namespace lorafit::cli {

using Action = std::function<void()>;

/// A number in [min, max], refused with a message a person reads ("must be at least 1, got
/// 0"), which CLI::Range and CLI::PositiveNumber do not give.
inline CLI::Validator in_range(double min, double max = std::numeric_limits<double>::infinity()) {
  auto text = [](double v) {
    std::string s = std::to_string(v);
    s.erase(s.find_last_not_of('0') + 1);
    if (s.back() == '.') s.pop_back();
    return s;
  };
  const std::string what =
      std::isinf(max) ? ">= " + text(min) : "in [" + text(min) + ", " + text(max) + "]";
  return CLI::Validator(
      [=](std::string& value) -> std::string {
        double v = 0;
        if (!CLI::detail::lexical_cast(value, v)) return "must be a number, got '" + value + "'";
        if (v < min || v > max) {
          return (std::isinf(max) ? "must be at least " + text(min)
                                  : "must be between " + text(min) + " and " + text(max)) +
                 ", got " + value;
        }
        return "";
      },
      what);
}

Action add_train(CLI::App& app);
Action add_validate(CLI::App& app);
Action add_eval(CLI::App& app);
Action add_merge(CLI::App& app);
Action add_init(CLI::App& app);
Action add_generate(CLI::App& app);
Action add_bench(CLI::App& app);
Action add_tokenize(CLI::App& app);

}  // namespace lorafit::cli
