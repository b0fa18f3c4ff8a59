// Chat records through the model's own template: the rendering, its tokens, and the loss mask
// found by rendering prefixes, token by token for Llama-3.1 and Qwen3.
#include <catch2/catch.hpp>

#include "test_util.h"
#include "tokenizer/chat.h"
#include "tokenizer/tokenizer.h"

using namespace lorafit;
using nlohmann::ordered_json;

namespace {

ordered_json msg(const std::string& role, const std::string& content) {
  return {{"role", role}, {"content", content}};
}

// The trained tokens as the vocabulary spells them, each run of them joined into one string.
std::vector<std::string> trained_runs(const Tokenizer& tok, const ChatTokens& c) {
  std::vector<std::string> runs;
  std::vector<int64_t> run;
  for (size_t k = 0; k <= c.ids.size(); ++k) {
    if (k < c.ids.size() && c.trained[k]) {
      run.push_back(c.ids[k]);
    } else if (!run.empty()) {
      runs.push_back(tok.decode(run));
      run.clear();
    }
  }
  return runs;
}

std::vector<std::string> trained_tokens(const Tokenizer& tok, const ChatTokens& c) {
  std::vector<std::string> out;
  for (size_t k = 0; k < c.ids.size(); ++k)
    if (c.trained[k]) out.push_back(tok.token(c.ids[k]));
  return out;
}

}  // namespace

TEST_CASE("Llama-3.1's template: only the assistant turns and their <|eot_id|> train",
          "[tokenizer][chat]") {
  const auto dir = test::fixture("tokenizers/llama3_1");
  const auto tok = load_tokenizer(dir);
  const auto chat = load_chat_template(dir, "");
  REQUIRE(chat.jinja);
  const ordered_json messages = {msg("system", "Be brief."), msg("user", "Hello world"),
                                 msg("assistant", "Hello world"), msg("user", "Numbers: 42"),
                                 msg("assistant", "42 it is.")};
  const auto c = render_chat(chat, tok, messages, false, ordered_json::object(), "rec");
  REQUIRE(c.text.rfind("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n", 0) == 0);
  REQUIRE(tok.encode(c.text, false) == c.ids);
  REQUIRE(trained_tokens(tok, c) == std::vector<std::string>{"Hello", "Ġworld", "<|eot_id|>", "42",
                                                             "Ġit", "Ġis", ".", "<|eot_id|>"});
  // The generation prompt is not a turn: nothing of it trains.
  const ordered_json prompt = {msg("user", "Hello world")};
  const auto p = render_chat(chat, tok, prompt, true, ordered_json::object(), "rec");
  const std::string header = "<|start_header_id|>assistant<|end_header_id|>\n\n";
  REQUIRE(p.text.size() > header.size());
  REQUIRE(p.text.substr(p.text.size() - header.size()) == header);
  REQUIRE(std::none_of(p.trained.begin(), p.trained.end(), [](bool t) { return t; }));
}

TEST_CASE("Qwen3's template: past reasoning is dropped and the masks still find each turn",
          "[tokenizer][chat]") {
  const auto dir = test::fixture("tokenizers/qwen3");
  const auto tok = load_tokenizer(dir);
  const auto chat = load_chat_template(dir, "");
  const ordered_json messages = {msg("user", "Hello world"),
                                 msg("assistant", "<think>\nfirst\n</think>\n\nHello world"),
                                 msg("user", "Numbers: 42"), msg("assistant", "42")};
  const auto c = render_chat(chat, tok, messages, false, ordered_json::object(), "rec");
  // The first answer's reasoning is gone from the text; the last keeps an empty think block.
  REQUIRE(c.text.find("first") == std::string::npos);
  REQUIRE(
      trained_runs(tok, c) ==
      std::vector<std::string>{"Hello world<|im_end|>\n", "<think>\n\n</think>\n\n42<|im_end|>\n"});
  REQUIRE(trained_tokens(tok, c).front() == "Hello");
  // enable_thinking false: the empty think block belongs to the prompt, not to the answer.
  const ordered_json one = {msg("user", "Hello world"), msg("assistant", "42")};
  const auto off = render_chat(chat, tok, one, false, {{"enable_thinking", false}}, "rec");
  REQUIRE(trained_runs(tok, off) == std::vector<std::string>{"42<|im_end|>\n"});
}

TEST_CASE("a template the conversation breaks names the record and the template's reason",
          "[tokenizer][chat]") {
  const auto dir = test::fixture("tokenizers/qwen3");
  const auto tok = load_tokenizer(dir);
  const auto chat = load_chat_template(dir, "");
  test::TempDir tmp;
  // Mistral-Nemo's template (tests/fixtures/jinja) insists on alternating roles.
  const auto jinja = ordered_json::parse(test::read_text(test::fixture("jinja/cases.json")));
  test::write_text(tmp / "nemo.jinja", jinja["templates"]["mistral_nemo"].get<std::string>());
  const auto nemo = load_chat_template(dir, tmp / "nemo.jinja");
  const ordered_json two_users = {msg("user", "Hello"), msg("user", "world")};
  REQUIRE_THROWS_WITH(
      render_chat(nemo, tok, two_users, false, ordered_json::object(), "data.jsonl:3"),
      Catch::Contains("data.jsonl:3: chat template '") &&
          Catch::Contains("raise_exception: After the optional system message, conversation "
                          "roles must alternate") &&
          Catch::Contains("the template rejects this conversation"));
  // An assistant turn first: Qwen3's template cannot render no messages, so nothing comes
  // before the turn and all of the text trains, its role header too.
  const ordered_json assistant_first = {msg("assistant", "Hello world")};
  const auto c = render_chat(chat, tok, assistant_first, false, ordered_json::object(), "r");
  REQUIRE(trained_runs(tok, c) == std::vector<std::string>{c.text});
  REQUIRE(load_chat_template(dir, "llama2").jinja == nullptr);
  test::write_text(tmp / "t.jinja", "{% for m in messages %}{{ m.content | nope }}{% endfor %}");
  REQUIRE_THROWS_WITH(load_chat_template(dir, tmp / "t.jinja"),
                      Catch::Contains("the filter 'nope' is not supported") &&
                          Catch::Contains("hint: set data.chat_template"));
}

TEST_CASE("chat renderings and their ids equal transformers' apply_chat_template",
          "[tokenizer][chat]") {
  // chat.json: what apply_chat_template gave on the full tokenizer files, recorded by
  // scripts/gpu_families_check.sh; the cut-down files here tokenize these texts exactly.
  size_t checked = 0;
  for (const char* name : {"llama3_1", "qwen3"}) {
    const auto dir = test::fixture(std::string("tokenizers/") + name);
    const auto tok = load_tokenizer(dir);
    const auto chat = load_chat_template(dir, "");
    const auto cases = ordered_json::parse(test::read_text(dir + "/chat.json"));
    for (const auto& c : cases) {
      INFO(name << " " << c["messages"].dump() << " " << c["kwargs"].dump());
      ordered_json vars = c["kwargs"];
      const bool gen = vars.value("add_generation_prompt", false);
      vars.erase("add_generation_prompt");
      const auto r = render_chat(chat, tok, c["messages"], gen, vars, "case");
      REQUIRE(r.text == c["text"].get<std::string>());
      REQUIRE(r.ids == c["ids"].get<std::vector<int64_t>>());
      ++checked;
    }
  }
  REQUIRE(checked == 14);
}
