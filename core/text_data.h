// Dataset files: JSON Lines (one object per line), a JSON array of objects, or plain text (one
// record per non-empty line, as {"text": line}). "-" reads JSON Lines from standard input.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace lorafit {

struct JsonRecord {
  nlohmann::ordered_json value;  // key order kept: templates print tool schemas in it
  std::string where;             // "file:line" (or "file: element i"), for messages
};

/// Every record of the file; a line that is not JSON is an IoError naming file and line.
std::vector<JsonRecord> read_json_records(const std::string& path);

struct TextRecord {
  std::string text;
  std::string where;
};

/// Records with a "text" string; any other record is an IoError naming file and line.
std::vector<TextRecord> read_text_records(const std::string& path);

}  // namespace lorafit
