// Errors that lorafit raises. Every user mistake (a bad file, recipe, flag or tensor) is a
// lorafit::Error and ends the process with exit code 2; anything else is a bug or an
// environment failure and ends it with exit code 1. Only cli/main.cpp catches.
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

namespace lorafit {

/// A user-facing problem: the message names the file, key or tensor, what was expected, and
/// a hint where one helps.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// A file that is missing, unreadable or malformed.
struct IoError : Error {
  using Error::Error;
};

/// Configuration values (config.json, adapter_config.json, recipes, flags) that are wrong.
struct ConfigError : Error {
  using Error::Error;
};

/// Tensors that are missing, unexpected, or of the wrong shape or dtype.
struct ModelMismatchError : Error {
  using Error::Error;
};

/// Joins several problems into one message, so the user fixes them all in one go.
/// At most `limit` are listed; the count of the rest is given.
inline std::string join_problems(const std::vector<std::string>& problems, size_t limit = 12) {
  std::string out;
  for (size_t i = 0; i < problems.size() && i < limit; ++i) {
    out += (i ? "; " : "") + problems[i];
  }
  if (problems.size() > limit) {
    out += "; and " + std::to_string(problems.size() - limit) + " more";
  }
  return out;
}

}  // namespace lorafit
