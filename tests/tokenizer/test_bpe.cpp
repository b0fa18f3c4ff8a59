// tokenizer.json (byte-level BPE) against Hugging Face's Rust tokenizers: the ids and decodes
// that scripts/make_tokenizer_fixtures.js took from it for the real Llama-3, Llama-3.1 and Qwen3
// files, and small hand-made files for single rules.
#include <catch2/catch.hpp>

#include "core/errors.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"

using namespace lorafit;
using lorafit::test::TempDir;
using lorafit::test::write_text;

namespace {

// The character GPT-2's byte map gives byte `b`, in UTF-8.
std::string byte_char(int b) {
  int cp = b;
  if (!((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174)) {
    cp = 256;
    for (int x = 0; x < b; ++x)
      cp += !((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || x >= 174);
  }
  if (cp < 0x80) return std::string(1, static_cast<char>(cp));
  return {static_cast<char>(0xC0 | (cp >> 6)), static_cast<char>(0x80 | (cp & 0x3F))};
}

// The vocabulary's spelling of the bytes of `text`.
std::string byte_chars(const std::string& text) {
  std::string out;
  for (const char c : text) out += byte_char(static_cast<unsigned char>(c));
  return out;
}

// A tokenizer.json with the 256 byte tokens (ids 0-255), `extra` vocabulary entries, merges,
// and the given pre-tokenizer and added tokens.
std::string small_tokenizer(const nlohmann::json& extra,
                            const nlohmann::json& merges,
                            const nlohmann::json& pre_tokenizer,
                            const nlohmann::json& added = nlohmann::json::array(),
                            bool ignore_merges = false) {
  nlohmann::json vocab = nlohmann::json::object();
  for (int b = 0; b < 256; ++b) vocab[byte_char(b)] = b;
  for (const auto& [token, id] : extra.items()) vocab[token] = id;
  return nlohmann::json{
      {"version", "1.0"},
      {"added_tokens", added},
      {"normalizer", nullptr},
      {"pre_tokenizer", pre_tokenizer},
      {"post_processor", nullptr},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model",
       {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}, {"ignore_merges", ignore_merges}}}}
      .dump();
}

const nlohmann::json kByteLevel = {{"type", "ByteLevel"}, {"use_regex", false}};

nlohmann::json split_then_bytes(const std::string& regex) {
  return {{"type", "Sequence"},
          {"pretokenizers",
           {{{"type", "Split"},
             {"pattern", {{"Regex", regex}}},
             {"behavior", "Isolated"},
             {"invert", false}},
            kByteLevel}}};
}

}  // namespace

TEST_CASE("tokenizer.json gives the ids and decodes of Hugging Face tokenizers",
          "[tokenizer][bpe]") {
  for (const char* name : {"llama3", "llama3_1", "qwen3"}) {
    INFO(name);
    const auto dir = lorafit::test::fixture(std::string("tokenizers/") + name);
    const auto tok = load_tokenizer(dir);
    REQUIRE(tok.path() == dir + "/tokenizer.json");
    for (const auto& r : lorafit::test::read_json(dir + "/expected.json")) {
      const std::string text = r["text"];
      INFO(nlohmann::json(text).dump());
      REQUIRE(tok.encode(text) == r["ids"].get<std::vector<int64_t>>());
      const auto special = tok.encode(text, /*add_special_tokens=*/true);
      REQUIRE(special == r["ids_special"].get<std::vector<int64_t>>());
      REQUIRE(tok.decode(special) == r["decoded"].get<std::string>());
    }
  }
  // Llama 3.1's post-processor adds <|begin_of_text|>; Qwen3's adds nothing.
  REQUIRE(
      load_tokenizer(lorafit::test::fixture("tokenizers/llama3_1")).encode("hi", true).front() ==
      128000);
  REQUIRE(load_tokenizer(lorafit::test::fixture("tokenizers/qwen3")).encode("hi", true) ==
          load_tokenizer(lorafit::test::fixture("tokenizers/qwen3")).encode("hi"));
}

TEST_CASE("\\s in a tokenizer.json pattern means Rust's White_Space: U+0085 yes, U+FEFF no",
          "[tokenizer][bpe]") {
  TempDir tmp;
  // The words a<U+0085>b and a<U+FEFF>b are whole vocabulary entries (ids 300, 301), which
  // ignore_merges emits only when the pre-tokenizer leaves the word in one piece.
  const nlohmann::json extra = {{byte_chars("a\xC2\x85"
                                            "b"),
                                 300},
                                {byte_chars("a\xEF\xBB\xBF"
                                            "b"),
                                 301}};
  write_text(tmp / "tokenizer.json",
             small_tokenizer(extra, nlohmann::json::array(), split_then_bytes("\\s+"),
                             nlohmann::json::array(), /*ignore_merges=*/true));
  const auto tok = load_tokenizer(tmp.path.string());
  REQUIRE(tok.encode("a\xC2\x85"
                     "b") == std::vector<int64_t>{'a', 0xC2, 0x85, 'b'});
  REQUIRE(tok.encode("a\xEF\xBB\xBF"
                     "b") == std::vector<int64_t>{301});
  REQUIRE(tok.decode({301}) ==
          "a\xEF\xBB\xBF"
          "b");
}

TEST_CASE("BPE merges by rank, and added tokens are found first, longest first",
          "[tokenizer][bpe]") {
  TempDir tmp;
  // Merges: "a b" (rank 0) before "b c" (rank 1): "abc" -> "ab" "c", never "a" "bc".
  const nlohmann::json extra = {{"ab", 300}, {"bc", 301}, {"abc", 302}};
  const nlohmann::json added = {
      {{"id", 400}, {"content", "<x>"}, {"special", true}},
      {{"id", 401}, {"content", "<x><y>"}, {"special", true}},
  };
  write_text(tmp / "tokenizer.json",
             small_tokenizer(extra, {"a b", "b c", "ab c"}, kByteLevel, added));
  const auto tok = load_tokenizer(tmp.path.string());
  REQUIRE(tok.encode("abc") == std::vector<int64_t>{302});
  REQUIRE(tok.encode("bcab") == std::vector<int64_t>{301, 300});
  REQUIRE(tok.encode("c<x><y>ab<x>") == std::vector<int64_t>{'c', 401, 300, 400});
  REQUIRE(tok.token(401) == "<x><y>");
  REQUIRE(tok.decode({'c', 401, 300}) == "c<x><y>ab");
  REQUIRE(tok.vocab_size() == 402);
}

TEST_CASE("a broken tokenizer.json is refused with the file and the problem", "[tokenizer][bpe]") {
  TempDir tmp;
  const auto file = tmp / "tokenizer.json";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {small_tokenizer({}, {"a b"}, kByteLevel).substr(0, 200), "is not valid JSON"},
      {small_tokenizer({}, {"a q"}, kByteLevel), "needs 'aq', which is not in the vocabulary"},
      {small_tokenizer({{"ab", 300}}, {"a zz"}, kByteLevel), "needs 'zz'"},
      {small_tokenizer({}, {"a"}, kByteLevel), "merge 0 'a' is not 'A B'"},
      {small_tokenizer({}, nlohmann::json::array(), split_then_bytes("(unclosed")),
       "does not compile"},
      {"[1, 2]", "not a JSON object"},
      {R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}})", "no token for byte 0"},
  };
  for (const auto& [text, fragment] : cases) {
    INFO(fragment);
    write_text(file, text);
    REQUIRE_THROWS_AS(load_tokenizer(tmp.path.string()), IoError);
    REQUIRE_THROWS_WITH(load_tokenizer(tmp.path.string()),
                        Catch::Contains(file) && Catch::Contains(fragment));
  }
  // A post-processor that adds an id the vocabulary lacks (found by fuzz_tokenizer_json).
  auto template_file =
      nlohmann::json::parse(small_tokenizer({}, nlohmann::json::array(), kByteLevel));
  template_file["post_processor"] = {
      {"type", "TemplateProcessing"},
      {"single", {{{"SpecialToken", {{"id", "<s>"}}}}, {{"Sequence", {{"id", "A"}}}}}},
      {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {600}}, {"tokens", {"<s>"}}}}}}};
  write_text(file, template_file.dump());
  REQUIRE_THROWS_WITH(load_tokenizer(tmp.path.string()),
                      Catch::Contains("the post-processor adds id 600, which is no token"));
  // A kind of tokenizer.json that lorafit does not compute is named, unless the folder's
  // tokenizer.model can stand in for it.
  auto other = nlohmann::json::parse(small_tokenizer({}, nlohmann::json::array(), kByteLevel));
  other["normalizer"] = {{"type", "Lowercase"}};
  write_text(file, other.dump());
  REQUIRE_THROWS_WITH(load_tokenizer(tmp.path.string()),
                      Catch::Contains("normalizer Lowercase is not supported"));
  lorafit::test::copy_folder(lorafit::test::fixture("gqa_llama3/model/tokenizer.model"),
                             tmp / "tokenizer.model");
  REQUIRE(load_tokenizer(tmp.path.string()).path() == tmp / "tokenizer.model");
}

TEST_CASE("tokenizer_config.json's eos_token ends records; the post-processor gives the BOS",
          "[tokenizer][bpe]") {
  const auto llama = load_tokenizer(lorafit::test::fixture("tokenizers/llama3_1"));
  REQUIRE(llama.eos_id() == 128009);  // <|eot_id|>, not config.json's first <|end_of_text|>
  REQUIRE(llama.encode("", true) == std::vector<int64_t>{128000});
  const auto qwen = load_tokenizer(lorafit::test::fixture("tokenizers/qwen3"));
  REQUIRE(qwen.eos_id() == 151645);  // <|im_end|>
  REQUIRE(qwen.encode("", true).empty());
  REQUIRE_FALSE(load_tokenizer(lorafit::test::fixture("gqa_llama3/model")).eos_id());

  TempDir tmp;
  lorafit::test::copy_folder(lorafit::test::fixture("tokenizers/qwen3/tokenizer.json"),
                             tmp / "tokenizer.json");
  for (const auto& [config, fragment] :
       {std::pair{std::string("{\"eos_token\": "), "is not a JSON object"},
        {"{\"eos_token\": {\"content\": \"<|nope|>\"}}", "eos_token '<|nope|>' is not a token"},
        {"{\"eos_token\": 7}", "neither a string"}}) {
    write_text(tmp / "tokenizer_config.json", config);
    REQUIRE_THROWS_WITH(load_tokenizer(tmp.path.string()),
                        Catch::Contains("tokenizer_config.json") && Catch::Contains(fragment));
  }
}
