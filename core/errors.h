// Errors that lorafit raises. Every user mistake (a bad file, recipe, flag or tensor) is a
// lorafit::Error and ends the process with exit code 2; a failure of the environment that
// lorafit can name (DistributedError) is an Error with exit code 1, as is anything else (a
// bug). Only cli/main.cpp catches.
#pragma once

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

namespace lorafit {

/// A user-facing problem: the message names the file, key or tensor, what was expected, and
/// a hint where one helps.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
  /// What the process exits with: 2, the user's to fix.
  virtual int exit_code() const { return 2; }
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

/// A run stopped by SIGINT or SIGTERM after writing what it needs to resume: not a mistake
/// and not a failure; the process exits with 128 + the signal, as the shell expects.
struct Interrupted : std::runtime_error {
  Interrupted(const std::string& message, int signal_number)
      : std::runtime_error(message), signal(signal_number) {}
  int signal;
};

/// A rank that died or hung, or a collective that failed: not the user's mistake but the
/// environment's, so the run ends with exit code 1, with the rank and the step named.
struct DistributedError : Error {
  using Error::Error;
  int exit_code() const override { return 1; }
};

/// The number of single-character edits that turn `a` into `b` (Levenshtein).
inline size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] != b[j - 1])});
      diag = up;
    }
  }
  return row[b.size()];
}

/// " (did you mean 'x'?)" for the closest candidate, if one is close; "" otherwise.
inline std::string did_you_mean(const std::string& word,
                                const std::vector<std::string>& candidates) {
  std::string best;
  size_t best_d = std::max<size_t>(2, word.size() / 3) + 1;
  for (const auto& c : candidates) {
    const size_t d = edit_distance(word, c);
    if (d < best_d) best_d = d, best = c;
  }
  return best.empty() ? "" : " (did you mean '" + best + "'?)";
}

/// A tensor shape as messages write it: "[4096, 11008]". Any range of integers (a
/// torch::IntArrayRef, a std::vector<int64_t>).
template <class Shape>
std::string shape_text(const Shape& shape) {
  std::string s = "[";
  bool first = true;
  for (const auto d : shape) {
    s += (first ? "" : ", ") + std::to_string(d);
    first = false;
  }
  return s + "]";
}

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
