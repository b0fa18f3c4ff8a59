#include "core/datasets.h"

#include <algorithm>
#include <filesystem>
#include <numeric>
#include <random>
#include <set>
#include <stdexcept>
#include <tuple>

#include "core/errors.h"
#include "core/text_data.h"

namespace lorafit {

namespace {

using nlohmann::ordered_json;

void append(Example& ex, const std::vector<int64_t>& ids, bool train) {
  ex.input_ids.insert(ex.input_ids.end(), ids.begin(), ids.end());
  if (train) {
    ex.labels.insert(ex.labels.end(), ids.begin(), ids.end());
  } else {
    ex.labels.insert(ex.labels.end(), ids.size(), kIgnoreLabel);
  }
}

const std::string& string_field(const JsonRecord& r, const char* key, bool optional = false) {
  static const std::string empty;
  auto it = r.value.is_object() ? r.value.find(key) : r.value.end();
  if (it == r.value.end() && optional) return empty;
  if (it == r.value.end() || !it->is_string()) {
    throw IoError(r.where + ": expected a \"" + key + "\" string");
  }
  return it->get_ref<const std::string&>();
}

// One example per document: BOS + tokens + EOS, all trained.
std::vector<Example> text_examples(const std::vector<JsonRecord>& records,
                                   const Tokenizer& tok,
                                   const DatasetOptions& o) {
  std::vector<Example> docs;
  for (const auto& r : records) {
    Example ex;
    append(ex, o.prefix, true);
    append(ex, tok.encode(string_field(r, "text")), true);
    append(ex, {o.eos}, true);
    docs.push_back(std::move(ex));
  }
  return docs;
}

// Consecutive pieces of at most max_len tokens of each example (the last one shorter).
std::vector<Example> chunks(const std::vector<Example>& examples, int64_t max_len) {
  std::vector<Example> out;
  const auto len = static_cast<size_t>(max_len);
  for (const auto& ex : examples) {
    for (size_t start = 0; start < ex.input_ids.size(); start += len) {
      const size_t end = std::min(ex.input_ids.size(), start + len);
      Example c;
      c.input_ids.assign(ex.input_ids.begin() + start, ex.input_ids.begin() + end);
      c.labels.assign(ex.labels.begin() + start, ex.labels.begin() + end);
      out.push_back(std::move(c));
    }
  }
  return out;
}

Example alpaca_example(const JsonRecord& r, const Tokenizer& tok, const DatasetOptions& o) {
  Example ex;
  append(ex, o.prefix, false);
  append(ex,
         tok.encode(alpaca_prompt(string_field(r, "instruction"), string_field(r, "input", true))),
         false);
  append(ex, tok.encode(string_field(r, "output")), true);
  append(ex, {o.eos}, true);
  return ex;
}

// LLaMA-2 chat: <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s> per turn.
Example llama2_chat(const JsonRecord& r,
                    const ordered_json& messages,
                    const Tokenizer& tok,
                    const DatasetOptions& o,
                    std::string* text) {
  std::vector<std::pair<std::string, std::string>> turns;  // (role, content)
  for (const auto& m : messages) {
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string() || !m.contains("content") ||
        !m["content"].is_string()) {
      throw IoError(r.where + ": each message needs \"role\" and \"content\" strings");
    }
    turns.emplace_back(m["role"], m["content"]);
  }
  std::string system;
  size_t i = 0;
  if (turns[0].first == "system") system = turns[i++].second;
  Example ex;
  for (; i < turns.size(); i += 2) {
    if (turns[i].first != "user" || i + 1 >= turns.size() || turns[i + 1].first != "assistant") {
      throw IoError(r.where +
                    ": messages must be an optional system message, then user and "
                    "assistant turns in alternation, ending with an assistant turn (the "
                    "llama2 chat format)");
    }
    std::string user = turns[i].second;
    if (!system.empty()) {
      user = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + user;
      system.clear();
    }
    append(ex, o.prefix, false);
    append(ex, tok.encode("[INST] " + user + " [/INST]"), false);
    append(ex, tok.encode(turns[i + 1].second), true);
    append(ex, {o.eos}, true);
  }
  if (text) *text = tok.decode(ex.input_ids);
  return ex;
}

}  // namespace

Example chat_example(const JsonRecord& r,
                     const Tokenizer& tok,
                     const DatasetOptions& o,
                     std::string* text) {
  auto it = r.value.is_object() ? r.value.find("messages") : r.value.end();
  if (it == r.value.end() || !it->is_array() || it->empty()) {
    throw IoError(r.where + ": expected a non-empty \"messages\" list");
  }
  for (const auto& m : *it) {
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string())
      throw IoError(r.where + ": each message needs a \"role\" string");
  }
  if (!o.chat || !o.chat->jinja) return llama2_chat(r, *it, tok, o, text);
  ordered_json variables = ordered_json::object();
  if (auto kw = r.value.find("chat_template_kwargs"); kw != r.value.end()) {
    if (!kw->is_object()) throw IoError(r.where + ": \"chat_template_kwargs\" must be an object");
    variables = *kw;
  }
  auto rendered = render_chat(*o.chat, tok, *it, o.add_generation_prompt, variables, r.where);
  Example ex;
  ex.input_ids = rendered.ids;
  for (size_t k = 0; k < rendered.ids.size(); ++k)
    ex.labels.push_back(rendered.trained[k] ? rendered.ids[k] : kIgnoreLabel);
  if (text) *text = std::move(rendered.text);
  return ex;
}

namespace {

Example tokens_example(const JsonRecord& r, const DatasetOptions& o) {
  auto ids = r.value.is_object() ? r.value.find("input_ids") : r.value.end();
  if (ids == r.value.end() || !ids->is_array())
    throw IoError(r.where + ": expected an \"input_ids\" list");
  Example ex;
  for (const auto& v : *ids) {
    if (!v.is_number_integer()) throw IoError(r.where + ": \"input_ids\" must hold integers");
    ex.input_ids.push_back(v.get<int64_t>());
  }
  auto labels = r.value.find("labels");
  if (labels == r.value.end()) {
    ex.labels = ex.input_ids;
  } else {
    if (!labels->is_array() || labels->size() != ex.input_ids.size()) {
      throw IoError(r.where + ": \"labels\" must be a list as long as \"input_ids\"");
    }
    for (const auto& v : *labels) {
      if (!v.is_number_integer()) throw IoError(r.where + ": \"labels\" must hold integers");
      ex.labels.push_back(v.get<int64_t>());
    }
  }
  return ex;
}

}  // namespace

DatasetOptions dataset_options(const Tokenizer& tokenizer,
                               const LlamaConfig& config,
                               const std::string& format,
                               int64_t max_seq_len,
                               Packing packing,
                               const std::string& chat_template) {
  DatasetOptions o;
  o.format = format;
  o.max_seq_len = max_seq_len;
  o.packing = packing;
  o.prefix = tokenizer.encode("", /*add_special_tokens=*/true);
  o.eos = tokenizer.eos_id().value_or(config.eos_token_ids.front());
  o.vocab_size = config.vocab_size;
  if (format == "chat") {
    o.chat = std::make_shared<ChatTemplate>(load_chat_template(
        std::filesystem::path(tokenizer.path()).parent_path().string(), chat_template));
  }
  return o;
}

Packing parse_packing(const std::string& value) {
  return value == "false" ? Packing::Pad : value == "concat" ? Packing::Concat : Packing::Records;
}

std::vector<Example> pack_records(std::vector<Example> records, int64_t max_len) {
  std::vector<size_t> order(records.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return records[a].input_ids.size() > records[b].input_ids.size();
  });
  // (room left, row): the first entry with room >= n is the fullest row the record fits.
  std::set<std::pair<int64_t, size_t>> room;
  std::vector<std::vector<size_t>> rows;
  for (const auto r : order) {
    const auto n = static_cast<int64_t>(records[r].input_ids.size());
    if (n > max_len) {
      throw std::invalid_argument("pack_records: a record of " + std::to_string(n) +
                                  " tokens is longer than the rows' " + std::to_string(max_len));
    }
    const auto fit = room.lower_bound({n, 0});
    int64_t left = max_len;
    size_t row = rows.size();
    if (fit == room.end()) {
      rows.emplace_back();
    } else {
      std::tie(left, row) = *fit;
      room.erase(fit);
    }
    rows[row].push_back(r);
    if (left > n) room.insert({left - n, row});
  }
  std::vector<Example> out;
  out.reserve(rows.size());
  for (const auto& members : rows) {
    Example row;
    for (const auto i : members) {
      auto& rec = records[i];
      rec.labels.front() = kIgnoreLabel;
      row.input_ids.insert(row.input_ids.end(), rec.input_ids.begin(), rec.input_ids.end());
      row.labels.insert(row.labels.end(), rec.labels.begin(), rec.labels.end());
      row.segments.push_back(static_cast<int64_t>(rec.input_ids.size()));
    }
    if (row.segments.size() == 1) row.segments.clear();
    out.push_back(std::move(row));
  }
  return out;
}

std::string alpaca_prompt(const std::string& instruction, const std::string& input) {
  if (input.empty()) {
    return "Below is an instruction that describes a task. Write a response that appropriately "
           "completes the request.\n\n### Instruction:\n" +
           instruction + "\n\n### Response:\n";
  }
  return "Below is an instruction that describes a task, paired with an input that provides "
         "further "
         "context. Write a response that appropriately completes the request.\n\n### "
         "Instruction:\n" +
         instruction + "\n\n### Input:\n" + input + "\n\n### Response:\n";
}

std::vector<Example> load_examples(const std::string& path,
                                   const Tokenizer& tokenizer,
                                   const DatasetOptions& o,
                                   size_t* record_count) {
  return load_examples(path, &tokenizer, o, record_count);
}

std::vector<Example> load_examples(const std::string& path,
                                   const Tokenizer* tokenizer,
                                   const DatasetOptions& o,
                                   size_t* record_count) {
  if (!tokenizer && o.format != "tokens") {
    throw ConfigError("dataset '" + path + "': format " + o.format +
                      " needs the model's tokenizer (hint: pre-tokenized records, format tokens, "
                      "need none)");
  }
  const auto records = read_json_records(path);
  if (record_count) *record_count = records.size();
  std::vector<Example> out;
  if (o.format == "text") {
    out = text_examples(records, *tokenizer, o);
  } else {
    for (const auto& r : records) {
      Example ex = o.format == "alpaca" ? alpaca_example(r, *tokenizer, o)
                   : o.format == "chat" ? chat_example(r, *tokenizer, o)
                                        : tokens_example(r, o);
      for (int64_t id : ex.input_ids) {
        if (id < 0 || (o.vocab_size > 0 && id >= o.vocab_size)) {
          throw IoError(r.where + ": token id " + std::to_string(id) +
                        " is outside the vocabulary of " + std::to_string(o.vocab_size));
        }
      }
      out.push_back(std::move(ex));
    }
  }
  if (o.format == "text" && o.packing == Packing::Concat) {
    Example all;
    for (const auto& d : out) append(all, d.input_ids, true);
    out = chunks({all}, o.max_seq_len);
  } else if (o.format == "text" && o.packing == Packing::Records) {
    out = chunks(out, o.max_seq_len);  // a long document trains whole, a chunk a record
  } else {
    for (auto& ex : out) {
      if (static_cast<int64_t>(ex.input_ids.size()) > o.max_seq_len) {
        ex.input_ids.resize(o.max_seq_len);
        ex.labels.resize(o.max_seq_len);
      }
    }
  }
  // A record trains only if some position has a target after it.
  std::vector<Example> usable;
  for (auto& ex : out) {
    const bool trains = std::any_of(ex.labels.begin() + 1, ex.labels.end(),
                                    [](int64_t l) { return l != kIgnoreLabel; });
    if (ex.input_ids.size() >= 2 && trains) usable.push_back(std::move(ex));
  }
  if (o.packing == Packing::Records) usable = pack_records(std::move(usable), o.max_seq_len);
  if (usable.empty()) {
    throw IoError("dataset '" + path + "' has no example with a token to train on" +
                  (records.empty() ? " (it holds no record)" : "") + " (hint: data.format is '" +
                  o.format + "'; is that the file's format?)");
  }
  return usable;
}

ExampleStream::ExampleStream(size_t size, uint64_t seed, DataPosition start, bool reshuffle)
    : size_(size), seed_(seed), pos_(start), shuffle_(reshuffle) {
  shuffle();
}

void ExampleStream::shuffle() {
  order_.resize(size_);
  std::iota(order_.begin(), order_.end(), 0);
  if (!shuffle_) return;
  // Fisher-Yates with mt19937_64, whose output the standard fixes: the same order on every
  // platform (std::shuffle's algorithm is left to the library).
  std::mt19937_64 rng(seed_ * 1000003ULL + static_cast<uint64_t>(pos_.epoch));
  for (size_t i = size_; i > 1; --i) {
    const size_t j = rng() % i;
    std::swap(order_[i - 1], order_[j]);
  }
}

std::vector<size_t> ExampleStream::next(size_t count) {
  std::vector<size_t> out;
  while (out.size() < count) {
    if (pos_.cursor >= static_cast<int64_t>(size_)) {
      ++pos_.epoch;
      pos_.cursor = 0;
      shuffle();
    }
    out.push_back(order_[pos_.cursor++]);
  }
  return out;
}

}  // namespace lorafit
