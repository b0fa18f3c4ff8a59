#include "tokenizer/bpe.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_map>

#include "core/errors.h"

namespace lorafit {

namespace {

using nlohmann::json;

std::string utf8(int32_t code_point) {
  utf8proc_uint8_t buf[4];
  const auto n = utf8proc_encode_char(code_point, buf);
  return std::string(reinterpret_cast<const char*>(buf), static_cast<size_t>(n));
}

// GPT-2's map from bytes to characters: printable bytes stand for themselves, the others for
// U+0100 upwards in byte order, so that every byte is a visible character of the vocabulary.
struct ByteMap {
  std::array<std::string, 256> to_char;          // UTF-8 of each byte's character
  std::unordered_map<int32_t, uint8_t> to_byte;  // code point -> byte
};

const ByteMap& byte_map() {
  static const ByteMap m = [] {
    ByteMap m;
    int32_t extra = 0;
    for (int32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
      const int32_t cp = printable ? b : 256 + extra++;
      m.to_char[b] = utf8(cp);
      m.to_byte[cp] = static_cast<uint8_t>(b);
    }
    return m;
  }();
  return m;
}

// The pattern's `\s` and `\S` as the Rust regex crate means them (Unicode White_Space, which
// has U+0085 and lacks U+FEFF), in PCRE2's spelling: PCRE2's own \s leaves U+0085 out.
std::string pcre2_pattern(const std::string& rust) {
  std::string out;
  for (size_t i = 0; i < rust.size(); ++i) {
    if (rust[i] == '\\' && i + 1 < rust.size()) {
      const char c = rust[++i];
      if (c == 's') {
        out += "\\p{White_Space}";
      } else if (c == 'S') {
        out += "\\P{White_Space}";
      } else {
        out += '\\';
        out += c;
      }
    } else {
      out += rust[i];
    }
  }
  return out;
}

// A compiled PCRE2 pattern: UTF, Unicode properties, invalid UTF-8 in the subject never
// matching, JIT where the library has it.
class Regex {
 public:
  Regex(const std::string& pattern, bool literal, const std::string& where) {
    int error = 0;
    PCRE2_SIZE at = 0;
    const auto source = literal ? pattern : pcre2_pattern(pattern);
    code_ = pcre2_compile(
        reinterpret_cast<PCRE2_SPTR>(source.data()), source.size(),
        PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF | (literal ? PCRE2_LITERAL : 0), &error,
        &at, nullptr);
    if (!code_) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(error, message, sizeof(message));
      throw IoError(where + ": the pattern '" + pattern + "' does not compile at offset " +
                    std::to_string(at) + ": " + reinterpret_cast<const char*>(message));
    }
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);  // without JIT the interpreter runs
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  /// The [begin, end) byte ranges of the successive matches in `text`.
  std::vector<std::pair<size_t, size_t>> find_all(const std::string& text) const {
    std::vector<std::pair<size_t, size_t>> out;
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(code_, nullptr);
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    size_t offset = 0;
    while (offset < text.size()) {
      const int rc = pcre2_match(code_, subject, text.size(), offset, 0, md, nullptr);
      if (rc < 0) break;  // no match (or none possible in what is left)
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      if (ov[1] == ov[0]) {  // an empty match: go on after the character there
        offset = ov[1] + 1;
        while (offset < text.size() && (static_cast<uint8_t>(text[offset]) & 0xC0) == 0x80)
          ++offset;
        continue;
      }
      out.emplace_back(ov[0], ov[1]);
      offset = ov[1];
    }
    pcre2_match_data_free(md);
    return out;
  }

 private:
  pcre2_code* code_ = nullptr;
};

// GPT-2's pre-tokenizer pattern, which ByteLevel with use_regex applies.
const char* const kGpt2Pattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

struct AddedToken {
  std::string content;
  int64_t id = 0;
  bool special = false, lstrip = false, rstrip = false, single_word = false, normalized = false;
};

// A piece of the input: text still to tokenize, or an added token already found.
struct Segment {
  std::string text;
  int64_t added = -1;  // the added token's id, or -1
};

enum class Normalization { NFC, NFD, NFKC, NFKD };

// One pre-tokenizer step: split each piece on a pattern (keeping the matches as pieces, or
// removing them), or ByteLevel (a space before each piece, GPT-2's split, bytes to characters).
struct PreTokenizer {
  enum class Kind { Isolated, Removed, ByteLevel } kind = Kind::Isolated;
  std::shared_ptr<Regex> regex;
  bool add_prefix_space = false;
};

// The post-processor's template for one sequence: ids before and after it.
struct Template {
  std::vector<int64_t> before, after;
};

bool is_word_byte(char c) {
  return std::isalnum(static_cast<unsigned char>(c)) || c == '_';
}

bool is_space_byte(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

// The length of the maximal ill-formed subsequence at `i`, which Rust's from_utf8_lossy
// replaces by one U+FFFD: a lead byte and the continuation bytes that could still complete it.
size_t invalid_prefix(const std::string& bytes, size_t i) {
  const auto b0 = static_cast<uint8_t>(bytes[i]);
  size_t need = 0;
  uint8_t lo = 0x80, hi = 0xBF;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 1;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 2;
    lo = b0 == 0xE0 ? 0xA0 : 0x80;
    hi = b0 == 0xED ? 0x9F : 0xBF;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 3;
    lo = b0 == 0xF0 ? 0x90 : 0x80;
    hi = b0 == 0xF4 ? 0x8F : 0xBF;
  }
  size_t n = 1;
  for (size_t k = 0; k < need && i + n < bytes.size(); ++k, ++n) {
    const auto c = static_cast<uint8_t>(bytes[i + n]);
    if (c < (k == 0 ? lo : 0x80) || c > (k == 0 ? hi : 0xBF)) break;
  }
  return n;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError("tokenizer '" + path + "' cannot be read (hint: check the path)");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A component of the pipeline that lorafit does not compute.
struct Unsupported : IoError {
  using IoError::IoError;
};

}  // namespace

struct ByteLevelBpe::Impl {
  std::string path;
  std::unordered_map<std::string, int64_t> vocab;
  std::vector<std::string> tokens;  // by id
  // (left id << 32 | right id) -> (rank, merged id)
  std::unordered_map<uint64_t, std::pair<int32_t, int64_t>> merges;
  bool ignore_merges = false;
  std::vector<AddedToken> added;
  std::array<std::vector<const AddedToken*>, 256> added_by_first;  // longest first
  std::vector<Normalization> normalizers;
  std::vector<PreTokenizer> pre_tokenizers;
  Template post;
  bool byte_level_decoder = false;
  mutable std::mutex cache_mutex;
  mutable std::unordered_map<std::string, std::vector<int64_t>> cache;  // word -> ids

  std::string where(const std::string& part) const { return "tokenizer '" + path + "': " + part; }

  void read_model(const json& model);
  void read_added(const json& list);
  void read_normalizer(const json& n);
  void read_pre_tokenizer(const json& p);
  void read_post_processor(const json& p);
  void read_decoder(const json& d);

  std::vector<Segment> split_added(const std::vector<Segment>& in, bool normalized) const;
  std::string normalize(const std::string& text) const;
  std::vector<std::string> pre_tokenize(const std::string& text) const;
  void bpe(const std::string& word, std::vector<int64_t>& out) const;
};

void ByteLevelBpe::Impl::read_model(const json& model) {
  if (!model.is_object() || model.value("type", "") != "BPE") {
    throw Unsupported(where("model type " +
                            (model.is_object() ? model.value("type", "?") : std::string("?")) +
                            " is not BPE"));
  }
  if (model.value("byte_fallback", false))
    throw Unsupported(
        where("a BPE model with byte_fallback (sentencepiece style) is not byte-level"));
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (model.contains(key) && !model[key].is_null() && model[key] != "")
      throw Unsupported(where(std::string("model.") + key + " is not supported"));
  }
  if (model.contains("dropout") && !model["dropout"].is_null() && model["dropout"] != 0.0)
    throw Unsupported(where("model.dropout (BPE dropout) is not supported"));
  ignore_merges = model.value("ignore_merges", false);
  const auto v = model.find("vocab");
  if (v == model.end() || !v->is_object()) throw IoError(where("model.vocab is not an object"));
  for (const auto& [token, id] : v->items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > (1 << 24))
      throw IoError(where("model.vocab['" + token + "'] is not a token id"));
    vocab[token] = id.get<int64_t>();
    const auto i = static_cast<size_t>(id.get<int64_t>());
    if (tokens.size() <= i) tokens.resize(i + 1);
    tokens[i] = token;
  }
  for (int b = 0; b < 256; ++b) {
    if (!vocab.count(byte_map().to_char[b])) {
      throw IoError(where("model.vocab has no token for byte " + std::to_string(b) +
                          " (a byte-level BPE vocabulary holds all 256)"));
    }
  }
  const auto m = model.find("merges");
  if (m == model.end() || !m->is_array()) throw IoError(where("model.merges is not a list"));
  int32_t rank = 0;
  for (const auto& merge : *m) {
    std::string left, right;
    if (merge.is_string()) {
      const auto& s = merge.get_ref<const std::string&>();
      const auto space = s.find(' ');
      if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos)
        throw IoError(where("merge " + std::to_string(rank) + " '" + s + "' is not 'A B'"));
      left = s.substr(0, space);
      right = s.substr(space + 1);
    } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() &&
               merge[1].is_string()) {
      left = merge[0];
      right = merge[1];
    } else {
      throw IoError(where("merge " + std::to_string(rank) + " is not 'A B' or [A, B]"));
    }
    const auto l = vocab.find(left), r = vocab.find(right), lr = vocab.find(left + right);
    for (const auto& [it, name] : {std::pair{l, left}, {r, right}, {lr, left + right}}) {
      if (it == vocab.end()) {
        throw IoError(where("merge " + std::to_string(rank) + " '" + left + " " + right +
                            "' needs '" + name + "', which is not in the vocabulary"));
      }
    }
    const uint64_t key = static_cast<uint64_t>(l->second) << 32 | static_cast<uint64_t>(r->second);
    merges.emplace(key, std::pair{rank, lr->second});  // a repeated merge keeps its first rank
    ++rank;
  }
}

void ByteLevelBpe::Impl::read_added(const json& list) {
  if (list.is_null()) return;
  if (!list.is_array()) throw IoError(where("added_tokens is not a list"));
  for (const auto& t : list) {
    if (!t.is_object() || !t.contains("id") || !t["id"].is_number_integer() ||
        !t.contains("content") || !t["content"].is_string() || t["content"] == "" ||
        t["id"].get<int64_t>() < 0 || t["id"].get<int64_t>() > (1 << 24)) {
      throw IoError(where("added_tokens holds an entry without an id and a content: " +
                          t.dump().substr(0, 80)));
    }
    AddedToken a;
    a.content = t["content"];
    a.id = t["id"];
    a.special = t.value("special", false);
    a.lstrip = t.value("lstrip", false);
    a.rstrip = t.value("rstrip", false);
    a.single_word = t.value("single_word", false);
    a.normalized = t.value("normalized", !a.special);
    added.push_back(a);
    const auto i = static_cast<size_t>(a.id);
    if (tokens.size() <= i) tokens.resize(i + 1);
    tokens[i] = a.content;
  }
  for (const auto& a : added) added_by_first[static_cast<uint8_t>(a.content[0])].push_back(&a);
  for (auto& list_ : added_by_first) {
    std::stable_sort(list_.begin(), list_.end(), [](const AddedToken* x, const AddedToken* y) {
      return x->content.size() > y->content.size();
    });
  }
}

void ByteLevelBpe::Impl::read_normalizer(const json& n) {
  if (n.is_null()) return;
  const auto type = n.value("type", "");
  if (type == "Sequence") {
    for (const auto& each : n.value("normalizers", json::array())) read_normalizer(each);
  } else if (type == "NFC") {
    normalizers.push_back(Normalization::NFC);
  } else if (type == "NFD") {
    normalizers.push_back(Normalization::NFD);
  } else if (type == "NFKC") {
    normalizers.push_back(Normalization::NFKC);
  } else if (type == "NFKD") {
    normalizers.push_back(Normalization::NFKD);
  } else {
    throw Unsupported(where("normalizer " + type + " is not supported"));
  }
}

void ByteLevelBpe::Impl::read_pre_tokenizer(const json& p) {
  if (p.is_null()) return;
  const auto type = p.value("type", "");
  if (type == "Sequence") {
    for (const auto& each : p.value("pretokenizers", json::array())) read_pre_tokenizer(each);
  } else if (type == "Split") {
    const auto pattern = p.value("pattern", json::object());
    const bool literal = pattern.contains("String");
    if (!literal && !(pattern.contains("Regex") && pattern["Regex"].is_string()))
      throw IoError(where("pre_tokenizer Split has no pattern"));
    const std::string text = literal ? pattern["String"] : pattern["Regex"];
    const auto behavior = p.value("behavior", "");
    if (p.value("invert", false) || (behavior != "Isolated" && behavior != "Removed"))
      throw Unsupported(where("pre_tokenizer Split with behavior " + behavior +
                              (p.value("invert", false) ? " (inverted)" : "") +
                              " is not supported"));
    PreTokenizer step;
    step.kind = behavior == "Isolated" ? PreTokenizer::Kind::Isolated : PreTokenizer::Kind::Removed;
    step.regex = std::make_shared<Regex>(text, literal, where("pre_tokenizer Split"));
    pre_tokenizers.push_back(step);
  } else if (type == "ByteLevel") {
    PreTokenizer step;
    step.kind = PreTokenizer::Kind::ByteLevel;
    step.add_prefix_space = p.value("add_prefix_space", false);
    if (p.value("use_regex", true))
      step.regex = std::make_shared<Regex>(kGpt2Pattern, false, where("pre_tokenizer ByteLevel"));
    pre_tokenizers.push_back(step);
  } else {
    throw Unsupported(where("pre_tokenizer " + type + " is not supported"));
  }
}

void ByteLevelBpe::Impl::read_post_processor(const json& p) {
  if (p.is_null()) return;
  const auto type = p.value("type", "");
  if (type == "Sequence") {
    for (const auto& each : p.value("processors", json::array())) read_post_processor(each);
  } else if (type == "TemplateProcessing") {
    // A single sequence: special tokens before and after $A.
    const auto specials = p.value("special_tokens", json::object());
    bool seen_a = false;
    for (const auto& item : p.value("single", json::array())) {
      if (item.contains("Sequence")) {
        seen_a = true;
      } else if (item.contains("SpecialToken")) {
        const std::string name = item["SpecialToken"].value("id", "");
        const auto s = specials.find(name);
        if (s == specials.end() || !s->contains("ids") || !(*s)["ids"].is_array())
          throw IoError(where("post_processor's template names special token '" + name +
                              "', which its special_tokens lack"));
        for (const auto& id : (*s)["ids"]) (seen_a ? post.after : post.before).push_back(id);
      }
    }
  } else if (type != "ByteLevel") {  // ByteLevel only moves offsets
    throw Unsupported(where("post_processor " + type + " is not supported"));
  }
}

void ByteLevelBpe::Impl::read_decoder(const json& d) {
  if (d.is_null()) return;
  const auto type = d.value("type", "");
  if (type != "ByteLevel") throw Unsupported(where("decoder " + type + " is not supported"));
  byte_level_decoder = true;
}

// Splits the text segments at added tokens, leftmost first and then longest, as the
// `tokenizers` added vocabulary does: tokens that see the raw text (normalized false) or the
// normalized text.
std::vector<Segment> ByteLevelBpe::Impl::split_added(const std::vector<Segment>& in,
                                                     bool normalized) const {
  std::vector<Segment> out;
  for (const auto& seg : in) {
    if (seg.added >= 0) {
      out.push_back(seg);
      continue;
    }
    const auto& text = seg.text;
    size_t start = 0;
    for (size_t i = 0; i < text.size();) {
      const AddedToken* hit = nullptr;
      for (const auto* a : added_by_first[static_cast<uint8_t>(text[i])]) {
        if (a->normalized != normalized || text.compare(i, a->content.size(), a->content) != 0)
          continue;
        const size_t end = i + a->content.size();
        if (a->single_word && ((i > 0 && is_word_byte(text[i - 1])) ||
                               (end < text.size() && is_word_byte(text[end]))))
          continue;
        hit = a;
        break;
      }
      if (!hit) {
        ++i;
        continue;
      }
      size_t b = i, e = i + hit->content.size();
      if (hit->lstrip)
        while (b > start && is_space_byte(text[b - 1])) --b;
      if (hit->rstrip)
        while (e < text.size() && is_space_byte(text[e])) ++e;
      if (b > start) out.push_back({text.substr(start, b - start), -1});
      out.push_back({"", hit->id});
      start = i = e;
    }
    if (start < text.size()) out.push_back({text.substr(start), -1});
  }
  return out;
}

std::string ByteLevelBpe::Impl::normalize(const std::string& text) const {
  // ASCII is its own normal form under all four.
  if (std::all_of(text.begin(), text.end(), [](char c) { return (c & 0x80) == 0; })) return text;
  std::string s = text;
  for (const auto n : normalizers) {
    const auto* src = reinterpret_cast<const utf8proc_uint8_t*>(s.c_str());
    utf8proc_uint8_t* r = n == Normalization::NFC    ? utf8proc_NFC(src)
                          : n == Normalization::NFD  ? utf8proc_NFD(src)
                          : n == Normalization::NFKC ? utf8proc_NFKC(src)
                                                     : utf8proc_NFKD(src);
    if (!r) continue;  // not valid UTF-8: left as it is
    s.assign(reinterpret_cast<const char*>(r));
    std::free(r);
  }
  return s;
}

std::vector<std::string> ByteLevelBpe::Impl::pre_tokenize(const std::string& text) const {
  std::vector<std::string> pieces{text};
  for (const auto& step : pre_tokenizers) {
    std::vector<std::string> next;
    for (auto& piece : pieces) {
      if (step.kind == PreTokenizer::Kind::ByteLevel && step.add_prefix_space &&
          (piece.empty() || piece.front() != ' '))
        piece.insert(piece.begin(), ' ');
      if (!step.regex) {
        next.push_back(piece);
      } else {
        size_t at = 0;
        for (const auto& [b, e] : step.regex->find_all(piece)) {
          if (b > at) next.push_back(piece.substr(at, b - at));
          if (step.kind != PreTokenizer::Kind::Removed) next.push_back(piece.substr(b, e - b));
          at = e;
        }
        if (at < piece.size()) next.push_back(piece.substr(at));
      }
    }
    if (step.kind == PreTokenizer::Kind::ByteLevel) {
      for (auto& piece : next) {
        std::string mapped;
        for (const char c : piece) mapped += byte_map().to_char[static_cast<uint8_t>(c)];
        piece = std::move(mapped);
      }
    }
    pieces = std::move(next);
  }
  return pieces;
}

// The ids of one pre-tokenized word (characters of the byte map): its own id under
// ignore_merges if the vocabulary has it, else its bytes merged pair by pair, always the
// lowest-ranked pair first and the leftmost of equals, as `tokenizers` merges.
void ByteLevelBpe::Impl::bpe(const std::string& word, std::vector<int64_t>& out) const {
  if (ignore_merges) {
    const auto whole = vocab.find(word);
    if (whole != vocab.end()) {
      out.push_back(whole->second);
      return;
    }
  }
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    const auto hit = cache.find(word);
    if (hit != cache.end()) {
      out.insert(out.end(), hit->second.begin(), hit->second.end());
      return;
    }
  }
  std::vector<int64_t> symbols;
  for (size_t i = 0; i < word.size();) {
    size_t n = 1;
    while (i + n < word.size() && (static_cast<uint8_t>(word[i + n]) & 0xC0) == 0x80) ++n;
    symbols.push_back(vocab.at(word.substr(i, n)));  // every byte character is in the vocab
    i += n;
  }
  while (symbols.size() > 1) {
    int32_t best_rank = INT32_MAX;
    size_t best = 0;
    int64_t merged = 0;
    for (size_t i = 0; i + 1 < symbols.size(); ++i) {
      const auto m = merges.find(static_cast<uint64_t>(symbols[i]) << 32 |
                                 static_cast<uint64_t>(symbols[i + 1]));
      if (m != merges.end() && m->second.first < best_rank)
        best_rank = m->second.first, best = i, merged = m->second.second;
    }
    if (best_rank == INT32_MAX) break;
    symbols[best] = merged;
    symbols.erase(symbols.begin() + static_cast<std::ptrdiff_t>(best) + 1);
  }
  out.insert(out.end(), symbols.begin(), symbols.end());
  std::lock_guard<std::mutex> lock(cache_mutex);
  if (cache.size() > (1 << 18)) cache.clear();
  cache.emplace(word, std::move(symbols));
}

ByteLevelBpe::ByteLevelBpe() : impl_(std::make_unique<Impl>()) {}
ByteLevelBpe::~ByteLevelBpe() = default;

std::unique_ptr<ByteLevelBpe> ByteLevelBpe::load(const std::string& path) {
  return parse(read_file(path), path);
}

std::unique_ptr<ByteLevelBpe> ByteLevelBpe::parse(const std::string& text,
                                                  const std::string& path) {
  std::unique_ptr<ByteLevelBpe> t(new ByteLevelBpe());
  auto& impl = *t->impl_;
  impl.path = path;
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    throw IoError("tokenizer '" + path + "' is not valid JSON (" + e.what() +
                  ") (hint: is the file complete?)");
  }
  if (!j.is_object()) throw IoError(impl.where("not a JSON object"));
  try {
    impl.read_model(j.value("model", json()));
    impl.read_added(j.value("added_tokens", json()));
    impl.read_normalizer(j.value("normalizer", json()));
    impl.read_pre_tokenizer(j.value("pre_tokenizer", json()));
    impl.read_post_processor(j.value("post_processor", json()));
    impl.read_decoder(j.value("decoder", json()));
  } catch (const json::exception& e) {
    throw IoError(impl.where(std::string("malformed (") + e.what() + ")"));
  }
  const bool byte_level =
      std::any_of(impl.pre_tokenizers.begin(), impl.pre_tokenizers.end(),
                  [](const PreTokenizer& p) { return p.kind == PreTokenizer::Kind::ByteLevel; });
  if (!byte_level || !impl.byte_level_decoder)
    throw Unsupported(impl.where("a BPE without a ByteLevel pre-tokenizer and decoder"));
  for (const auto* ids : {&impl.post.before, &impl.post.after}) {
    for (const auto id : *ids) {
      if (t->token(id).empty()) {
        throw IoError(impl.where("the post-processor adds id " + std::to_string(id) +
                                 ", which is no token of the vocabulary or the added tokens"));
      }
    }
  }
  return t;
}

bool ByteLevelBpe::supported(const std::string& path) {
  try {
    load(path);
    return true;
  } catch (const Unsupported&) {
    return false;
  } catch (const IoError&) {
    return true;  // lorafit's kind, but broken: load() says how
  }
}

std::vector<int64_t> ByteLevelBpe::encode(const std::string& text, bool add_special_tokens) const {
  const auto& impl = *impl_;
  auto segments = impl.split_added({{text, -1}}, /*normalized=*/false);
  for (auto& s : segments)
    if (s.added < 0) s.text = impl.normalize(s.text);
  segments = impl.split_added(segments, /*normalized=*/true);
  std::vector<int64_t> ids;
  if (add_special_tokens) ids = impl.post.before;
  for (const auto& s : segments) {
    if (s.added >= 0) {
      ids.push_back(s.added);
      continue;
    }
    for (const auto& word : impl.pre_tokenize(s.text)) impl.bpe(word, ids);
  }
  if (add_special_tokens) ids.insert(ids.end(), impl.post.after.begin(), impl.post.after.end());
  return ids;
}

std::string ByteLevelBpe::decode(const std::vector<int64_t>& ids) const {
  const auto& to_byte = byte_map().to_byte;
  std::string bytes;
  for (const auto id : ids) {
    const auto t = token(id);
    // A token all of whose characters are in the byte map gives those bytes; any other (an
    // added token's own text) gives its text, as the ByteLevel decoder does.
    std::string decoded;
    bool mapped = true;
    for (size_t i = 0; i < t.size() && mapped;) {
      utf8proc_int32_t cp = 0;
      const auto n = utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(t.data()) + i,
                                      static_cast<utf8proc_ssize_t>(t.size() - i), &cp);
      const auto b = n > 0 ? to_byte.find(cp) : to_byte.end();
      if (b == to_byte.end()) {
        mapped = false;
      } else {
        decoded += static_cast<char>(b->second);
        i += static_cast<size_t>(n);
      }
    }
    bytes += mapped ? decoded : t;
  }
  // Invalid UTF-8 becomes U+FFFD, as Rust's from_utf8_lossy does.
  std::string text;
  for (size_t i = 0; i < bytes.size();) {
    utf8proc_int32_t cp = 0;
    const auto n = utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(bytes.data()) + i,
                                    static_cast<utf8proc_ssize_t>(bytes.size() - i), &cp);
    if (n > 0) {
      text.append(bytes, i, static_cast<size_t>(n));
      i += static_cast<size_t>(n);
    } else {
      text += "\xEF\xBF\xBD";
      i += invalid_prefix(bytes, i);
    }
  }
  return text;
}

int64_t ByteLevelBpe::vocab_size() const {
  return static_cast<int64_t>(impl_->tokens.size());
}

std::string ByteLevelBpe::token(int64_t id) const {
  const auto& tokens = impl_->tokens;
  return id >= 0 && static_cast<size_t>(id) < tokens.size() ? tokens[static_cast<size_t>(id)] : "";
}

std::optional<int64_t> ByteLevelBpe::token_id(const std::string& token) const {
  for (const auto& a : impl_->added)
    if (a.content == token) return a.id;
  const auto it = impl_->vocab.find(token);
  if (it == impl_->vocab.end()) return std::nullopt;
  return it->second;
}

}  // namespace lorafit
