#include <catch2/catch.hpp>

#include "core/errors.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"

using namespace lorafit;

TEST_CASE("the tokenizer gives sentencepiece's ids and decodes back", "[tokenizer]") {
  const auto tok = load_tokenizer(lorafit::test::fixture("gqa_llama3/model"));
  REQUIRE(tok.vocab_size() == 320);
  const std::string text = "Café au lait, naïve façade — ünïcode bytes!";
  const auto ids = tok.encode(text);
  REQUIRE(!ids.empty());
  REQUIRE(ids.front() != 1);  // no BOS: the model's config decides that
  REQUIRE(tok.decode(ids) == text);
}

TEST_CASE("a missing or broken tokenizer is refused with its path", "[tokenizer]") {
  lorafit::test::TempDir tmp;
  REQUIRE_THROWS_WITH(load_tokenizer(tmp.path.string()),
                      Catch::Contains("tokenizer.model' not found"));
  lorafit::test::write_text(tmp / "tokenizer.model", "not a model");
  REQUIRE_THROWS_WITH(load_tokenizer(tmp.path.string()),
                      Catch::Contains("is not a sentencepiece model"));
}
