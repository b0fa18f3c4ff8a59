#include "core/text_data.h"

#include <fstream>
#include <iostream>

#include "core/errors.h"

namespace lorafit {

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::vector<JsonRecord> read_jsonl(std::istream& in, const std::string& name) {
  std::vector<JsonRecord> out;
  std::string line;
  for (size_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = name + ":" + std::to_string(n);
    try {
      out.push_back({nlohmann::ordered_json::parse(line), where});
    } catch (const nlohmann::json::exception& e) {
      throw IoError(where + ": not valid JSON (" + std::string(e.what()) + ")");
    }
  }
  return out;
}

}  // namespace

std::vector<JsonRecord> read_json_records(const std::string& path) {
  if (path == "-") return read_jsonl(std::cin, "<stdin>");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError("cannot read dataset '" + path + "'");
  if (ends_with(path, ".jsonl")) return read_jsonl(in, path);
  std::vector<JsonRecord> out;
  if (ends_with(path, ".json")) {
    nlohmann::ordered_json j;
    try {
      in >> j;
    } catch (const nlohmann::ordered_json::exception& e) {
      throw IoError(path + ": not valid JSON (" + std::string(e.what()) + ")");
    }
    if (!j.is_array()) throw IoError(path + ": expected a JSON array of records");
    for (size_t i = 0; i < j.size(); ++i) {
      out.push_back({std::move(j[i]), path + ": element " + std::to_string(i)});
    }
    return out;
  }
  if (ends_with(path, ".txt")) {
    std::string line;
    for (size_t n = 1; std::getline(in, line); ++n) {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (!line.empty())
        out.push_back({nlohmann::ordered_json{{"text", line}}, path + ":" + std::to_string(n)});
    }
    return out;
  }
  throw IoError("dataset '" + path + "' has an unknown extension (expected .jsonl, .json or .txt)");
}

std::vector<TextRecord> read_text_records(const std::string& path) {
  std::vector<TextRecord> out;
  for (auto& r : read_json_records(path)) {
    auto it = r.value.is_object() ? r.value.find("text") : r.value.end();
    if (it == r.value.end() || !it->is_string()) {
      throw IoError(r.where + ": expected a JSON object with a \"text\" string, got " +
                    r.value.dump().substr(0, 80));
    }
    out.push_back({it->get<std::string>(), r.where});
  }
  return out;
}

}  // namespace lorafit
