#include <catch2/catch.hpp>

#include "core/datasets.h"
#include "core/errors.h"
#include "core/text_data.h"
#include "core/trainer.h"
#include "test_util.h"

using namespace lorafit;
using lorafit::test::TempDir;

namespace {

const Tokenizer& tokenizer() {
  static const Tokenizer tok = load_tokenizer(lorafit::test::fixture("gqa_llama3/model"));
  return tok;
}

std::vector<Example> examples_of(const std::string& jsonl,
                                 const std::string& format,
                                 int64_t max_len = 512,
                                 Packing packing = Packing::Pad) {
  TempDir tmp;
  lorafit::test::write_text(tmp / "d.jsonl", jsonl);
  return load_examples(tmp / "d.jsonl", tokenizer(), {format, max_len, packing, {1}, 2, 320});
}

// The expected example, built piece by piece: (ids, trained?) segments.
Example expected(const std::vector<std::pair<std::vector<int64_t>, bool>>& segments) {
  Example ex;
  for (const auto& [ids, train] : segments) {
    for (auto id : ids) {
      ex.input_ids.push_back(id);
      ex.labels.push_back(train ? id : kIgnoreLabel);
    }
  }
  return ex;
}

void require_equal(const Example& a, const Example& b) {
  REQUIRE(a.input_ids == b.input_ids);
  REQUIRE(a.labels == b.labels);
}

}  // namespace

TEST_CASE("alpaca trains on the response and its EOS only", "[core][datasets]") {
  const auto ex =
      examples_of(R"({"instruction": "Name a bird.", "input": "", "output": "A sparrow."})"
                  "\n"
                  R"({"instruction": "Add.", "input": "2 and 3", "output": "5"})",
                  "alpaca");
  REQUIRE(ex.size() == 2);
  const auto& tok = tokenizer();
  require_equal(ex[0], expected({{{1}, false},
                                 {tok.encode(alpaca_prompt("Name a bird.", "")), false},
                                 {tok.encode("A sparrow."), true},
                                 {{2}, true}}));
  require_equal(ex[1], expected({{{1}, false},
                                 {tok.encode(alpaca_prompt("Add.", "2 and 3")), false},
                                 {tok.encode("5"), true},
                                 {{2}, true}}));
  REQUIRE_THAT(alpaca_prompt("Add.", "2 and 3"),
               Catch::Contains("### Input:\n2 and 3\n\n### Response:\n"));
}

TEST_CASE("chat trains on assistant turns only in LLaMA-2's template", "[core][datasets]") {
  const auto ex = examples_of(
      R"({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},)"
      R"( {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},)"
      R"( {"role": "assistant", "content": "Bye now."}]})",
      "chat");
  const auto& tok = tokenizer();
  require_equal(ex[0],
                expected({{{1}, false},
                          {tok.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"), false},
                          {tok.encode("Hello."), true},
                          {{2}, true},
                          {{1}, false},
                          {tok.encode("[INST] Bye [/INST]"), false},
                          {tok.encode("Bye now."), true},
                          {{2}, true}}));
}

TEST_CASE("concatenated text runs documents into blocks with EOS between them",
          "[core][datasets]") {
  const auto& tok = tokenizer();
  const auto packed =
      examples_of("{\"text\": \"The cat sat.\"}\n{\"text\": \"A dog ran far away.\"}\n", "text",
                  /*max_len=*/8, Packing::Concat);
  std::vector<int64_t> stream{1};
  for (auto id : tok.encode("The cat sat.")) stream.push_back(id);
  stream.push_back(2);
  stream.push_back(1);
  for (auto id : tok.encode("A dog ran far away.")) stream.push_back(id);
  stream.push_back(2);
  std::vector<int64_t> joined;
  for (const auto& b : packed) {
    REQUIRE(b.input_ids.size() <= 8);
    REQUIRE(b.labels == b.input_ids);
    joined.insert(joined.end(), b.input_ids.begin(), b.input_ids.end());
  }
  REQUIRE(joined == stream);
  const auto unpacked = examples_of("{\"text\": \"The cat sat.\"}\n", "text", 512);
  REQUIRE(unpacked.size() == 1);
  REQUIRE(unpacked[0].input_ids.front() == 1);
  REQUIRE(unpacked[0].input_ids.back() == 2);
}

TEST_CASE("records pack whole into the fullest row they fit, apart from each other",
          "[core][datasets]") {
  auto record = [](int64_t n, int64_t first_id) {
    Example ex;
    for (int64_t i = 0; i < n; ++i) ex.input_ids.push_back(first_id + i);
    ex.labels = ex.input_ids;
    return ex;
  };
  // Best fit decreasing into rows of 10: 7 -> A, 6 -> B, 4 -> B (A has 3 left), 3 -> A,
  // 2 -> C (A and B are full).
  const auto rows = pack_records(
      {record(3, 100), record(7, 200), record(2, 300), record(6, 400), record(4, 500)}, 10);
  REQUIRE(rows.size() == 3);
  REQUIRE(rows[0].segments == std::vector<int64_t>{7, 3});
  REQUIRE(rows[1].segments == std::vector<int64_t>{6, 4});
  REQUIRE(rows[2].segments.empty());  // one record: an ordinary row
  REQUIRE(rows[0].input_ids ==
          std::vector<int64_t>{200, 201, 202, 203, 204, 205, 206, 100, 101, 102});
  // A record's first token is never a target: the record before it must not predict it.
  REQUIRE(rows[0].labels ==
          std::vector<int64_t>{-100, 201, 202, 203, 204, 205, 206, -100, 101, 102});
  REQUIRE(rows[2].input_ids == std::vector<int64_t>{300, 301});
  REQUIRE_THROWS_WITH(pack_records({record(11, 0)}, 10), Catch::Contains("longer than"));

  // The formats: alpaca records pack whole (cut to max_seq_len first, as unpacked); text
  // documents longer than a row train whole, in chunks of it, each its own record.
  const std::string alpaca =
      R"({"instruction": "Name a bird.", "input": "", "output": "A sparrow."})"
      "\n"
      R"({"instruction": "Add.", "input": "2 and 3", "output": "5"})";
  const auto one_each = examples_of(alpaca, "alpaca", 512);
  const auto packed = examples_of(alpaca, "alpaca", 512, Packing::Records);
  REQUIRE(packed.size() == 1);
  REQUIRE(packed[0].segments.size() == 2);
  int64_t targets = 0, unpacked_targets = 0;
  for (const auto& ex : packed)
    targets += std::count_if(ex.labels.begin(), ex.labels.end(), [](int64_t l) { return l >= 0; });
  for (const auto& ex : one_each)
    unpacked_targets +=
        std::count_if(ex.labels.begin() + 1, ex.labels.end(), [](int64_t l) { return l >= 0; });
  REQUIRE(targets == unpacked_targets);
  const auto& tok = tokenizer();
  const std::string long_text = "A dog ran far away, and then it ran all the way back home.";
  const auto doc = 2 + static_cast<int64_t>(tok.encode(long_text).size()),
             short_doc = 2 + static_cast<int64_t>(tok.encode("Hi.").size());
  const auto chunked = examples_of("{\"text\": \"" + long_text + "\"}\n{\"text\": \"Hi.\"}\n",
                                   "text", 8, Packing::Records);
  int64_t tokens = 0;
  for (const auto& ex : chunked) {
    REQUIRE(ex.input_ids.size() <= 8);
    tokens += static_cast<int64_t>(ex.input_ids.size());
  }
  // Every token of both documents, but a last chunk of one token (nothing to predict in it).
  REQUIRE(tokens >= doc + short_doc - 1);
  REQUIRE(tokens <= doc + short_doc);
  REQUIRE(doc > 8);
}

TEST_CASE("tokens records keep their ids and labels", "[core][datasets]") {
  const auto ex = examples_of(
      "{\"input_ids\": [1, 5, 6, 7], \"labels\": [-100, -100, 6, 7]}\n"
      "{\"input_ids\": [1, 9, 10]}\n",
      "tokens");
  REQUIRE(ex[0].labels == std::vector<int64_t>{-100, -100, 6, 7});
  REQUIRE(ex[1].labels == ex[1].input_ids);
}

TEST_CASE("a bad record names its file and line", "[core][datasets]") {
  REQUIRE_THROWS_WITH(
      examples_of("{\"instruction\": \"x\", \"output\": \"y\"}\n{\"instruction\": \"x\"}\n",
                  "alpaca"),
      Catch::Contains("d.jsonl:2: expected a \"output\" string"));
  REQUIRE_THROWS_WITH(
      examples_of("{\"messages\": [{\"role\": \"assistant\", \"content\": \"x\"}]}\n", "chat"),
      Catch::Contains("d.jsonl:1: messages must be"));
  REQUIRE_THROWS_WITH(examples_of("{\"input_ids\": [1, 999]}\n", "tokens"),
                      Catch::Contains("d.jsonl:1: token id 999 is outside the vocabulary"));
  REQUIRE_THROWS_WITH(examples_of("{\"text\": \"ok\"}\nnot json\n", "text"),
                      Catch::Contains("d.jsonl:2: not valid JSON"));
}

TEST_CASE("the example stream is a seeded permutation per epoch and resumes exactly",
          "[core][datasets]") {
  ExampleStream a(10, 42);
  const auto first = a.next(10), second = a.next(10);
  auto sorted = first;
  std::sort(sorted.begin(), sorted.end());
  for (size_t i = 0; i < 10; ++i) REQUIRE(sorted[i] == i);
  REQUIRE(first != second);  // reshuffled each epoch
  REQUIRE(ExampleStream(10, 43).next(10) != first);

  ExampleStream b(10, 42);
  b.next(13);
  ExampleStream resumed(10, 42, b.position());
  ExampleStream reference(10, 42);
  reference.next(13);
  REQUIRE(resumed.next(25) == reference.next(25));
}

TEST_CASE("learning-rate schedules follow transformers'", "[core][trainer]") {
  TrainRecipe t;
  t.lr = 1.0;
  t.warmup_steps = 10;
  const int64_t total = 110;
  REQUIRE(scheduled_lr(t, 0, total) == 0.0);
  REQUIRE(scheduled_lr(t, 5, total) == Approx(0.5));
  for (const char* s : {"constant", "linear", "cosine"}) {
    t.schedule = s;
    INFO(s);
    REQUIRE(scheduled_lr(t, 10, total) == Approx(1.0));
    REQUIRE(scheduled_lr(t, 60, total) == Approx(std::string(s) == "constant" ? 1.0 : 0.5));
  }
  t.schedule = "cosine";
  REQUIRE(scheduled_lr(t, 35, total) == Approx(0.5 * (1 + std::cos(M_PI * 0.25))));
  REQUIRE(scheduled_lr(t, 110, total) == Approx(0.0).margin(1e-12));
}

TEST_CASE("text records come from JSON Lines and JSON arrays and plain text alike",
          "[core][datasets]") {
  TempDir tmp;
  lorafit::test::write_text(tmp / "a.jsonl", "{\"text\": \"one\"}\n\n{\"text\": \"two\"}\n");
  lorafit::test::write_text(tmp / "a.json", "[{\"text\": \"one\"}, {\"text\": \"two\"}]");
  lorafit::test::write_text(tmp / "a.txt", "one\r\n\ntwo\n");
  for (const char* name : {"a.jsonl", "a.json", "a.txt"}) {
    INFO(name);
    const auto records = read_text_records(tmp / name);
    REQUIRE(records.size() == 2);
    REQUIRE(records[0].text == "one");
    REQUIRE(records[1].text == "two");
  }
  REQUIRE(read_text_records(tmp / "a.jsonl")[1].where == tmp / "a.jsonl:3");
  lorafit::test::write_text(tmp / "a.csv", "text\none\n");
  REQUIRE_THROWS_WITH(read_text_records(tmp / "a.csv"), Catch::Contains("unknown extension"));
  lorafit::test::write_text(tmp / "b.json", "{\"text\": \"one\"}");
  REQUIRE_THROWS_WITH(read_text_records(tmp / "b.json"), Catch::Contains("expected a JSON array"));
}
