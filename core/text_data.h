// Text datasets: JSON Lines with a "text" string per line, a JSON array of such objects, or
// plain text (one record per non-empty line). "-" reads JSON Lines from standard input.
#pragma once

#include <string>
#include <vector>

namespace lorafit {

struct TextRecord {
  std::string text;
  size_t line = 0;  // 1-based line (JSON Lines, text) or array index (JSON), for messages
};

/// Reads every record; a bad line is an IoError naming the file and line number.
std::vector<TextRecord> read_text_records(const std::string& path);

}  // namespace lorafit
