#include "core/text_data.h"

#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/errors.h"

namespace lorafit {

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string text_of(const nlohmann::json& j, const std::string& where) {
  auto it = j.is_object() ? j.find("text") : j.end();
  if (it == j.end() || !it->is_string()) {
    throw IoError(where + ": expected a JSON object with a \"text\" string, got " +
                  j.dump().substr(0, 80));
  }
  return it->get<std::string>();
}

std::vector<TextRecord> read_jsonl(std::istream& in, const std::string& name) {
  std::vector<TextRecord> out;
  std::string line;
  for (size_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = name + ":" + std::to_string(n);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      throw IoError(where + ": not valid JSON (" + std::string(e.what()) + ")");
    }
    out.push_back({text_of(j, where), n});
  }
  return out;
}

}  // namespace

std::vector<TextRecord> read_text_records(const std::string& path) {
  if (path == "-") return read_jsonl(std::cin, "<stdin>");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError("cannot read dataset '" + path + "'");
  if (ends_with(path, ".jsonl")) return read_jsonl(in, path);
  if (ends_with(path, ".json")) {
    nlohmann::json j;
    try {
      in >> j;
    } catch (const nlohmann::json::exception& e) {
      throw IoError(path + ": not valid JSON (" + std::string(e.what()) + ")");
    }
    if (!j.is_array()) throw IoError(path + ": expected a JSON array of {\"text\": ...} objects");
    std::vector<TextRecord> out;
    for (size_t i = 0; i < j.size(); ++i) {
      out.push_back({text_of(j[i], path + ": element " + std::to_string(i)), i});
    }
    return out;
  }
  if (ends_with(path, ".txt")) {
    std::vector<TextRecord> out;
    std::string line;
    for (size_t n = 1; std::getline(in, line); ++n) {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (!line.empty()) out.push_back({line, n});
    }
    return out;
  }
  throw IoError("dataset '" + path + "' has an unknown extension (expected .jsonl, .json or .txt)");
}

}  // namespace lorafit
