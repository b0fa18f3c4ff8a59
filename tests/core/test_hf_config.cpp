#include <catch2/catch.hpp>

#include "core/errors.h"
#include "core/hf_config.h"
#include "test_util.h"

using namespace lorafit;

namespace {

nlohmann::json base_config() {
  return {{"model_type", "llama"},  {"hidden_size", 64},        {"intermediate_size", 128},
          {"num_hidden_layers", 2}, {"num_attention_heads", 4}, {"vocab_size", 100}};
}

LlamaConfig parse(const nlohmann::json& j) {
  return parse_llama_config(j.dump(), "config.json");
}

}  // namespace

TEST_CASE("config defaults follow transformers", "[core][config]") {
  const auto c = parse(base_config());
  REQUIRE(c.num_key_value_heads == 4);
  REQUIRE(c.head_dim == 16);
  REQUIRE(c.rope.type == RopeType::Default);
  REQUIRE(c.rope.theta == 10000.0);
  REQUIRE_FALSE(c.tie_word_embeddings);
}

TEST_CASE("both rope spellings parse to the same settings", "[core][config]") {
  auto v4 = base_config();
  v4["rope_theta"] = 500000.0;
  v4["rope_scaling"] = {{"rope_type", "llama3"},
                        {"factor", 32.0},
                        {"low_freq_factor", 1.0},
                        {"high_freq_factor", 4.0},
                        {"original_max_position_embeddings", 8192}};
  auto v5 = base_config();
  v5["rope_parameters"] = v4["rope_scaling"];
  v5["rope_parameters"]["rope_theta"] = 500000.0;
  for (const auto& j : {v4, v5}) {
    const auto c = parse(j);
    REQUIRE(c.rope.type == RopeType::Llama3);
    REQUIRE(c.rope.theta == 500000.0);
    REQUIRE(c.rope.factor == 32.0);
    REQUIRE(c.rope.original_max_position_embeddings == 8192);
  }
  auto legacy_type = base_config();
  legacy_type["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  REQUIRE(parse(legacy_type).rope.type == RopeType::Linear);
}

TEST_CASE("the fixtures' configs parse as transformers wrote them", "[core][config]") {
  const auto gqa = load_llama_config(lorafit::test::fixture("gqa_llama3/model"));
  REQUIRE(gqa.head_dim == 16);
  REQUIRE(gqa.hidden_size / gqa.num_attention_heads == 8);
  REQUIRE(gqa.num_key_value_heads == 2);
  REQUIRE(gqa.tie_word_embeddings);
  REQUIRE(gqa.rope.type == RopeType::Llama3);
  const auto mha = load_llama_config(lorafit::test::fixture("mha_linear/model"));
  REQUIRE(mha.rope.type == RopeType::Linear);
  REQUIRE(mha.rope.theta == 500000.0);
  REQUIRE(mha.rms_norm_eps == 1e-6);
}

TEST_CASE("eos_token_id may be a list", "[core][config]") {
  auto j = base_config();
  j["eos_token_id"] = {7, 8, 9};
  REQUIRE(parse(j).eos_token_ids == std::vector<int64_t>{7, 8, 9});
}

TEST_CASE("unsupported configs are refused with the reason", "[core][config]") {
  auto expect = [](nlohmann::json j, const std::string& fragment) {
    INFO(fragment);
    REQUIRE_THROWS_WITH(parse(j), Catch::Contains(fragment));
  };
  auto j = base_config();
  j["model_type"] = "qwen3_moe";
  expect(j, "model_type is \"qwen3_moe\"");
  j = base_config();
  j["model_type"] = "mixtral";
  expect(j, "model_type is \"mixtral\"");
  j = base_config();
  j["num_local_experts"] = 8;
  expect(j, "'num_local_experts' is 8");
  j = base_config();
  j["vision_config"] = nlohmann::json::object();
  expect(j, "'vision_config' is present");
  j = base_config();
  j["mlp_bias"] = true;
  expect(j, "'mlp_bias' is true");
  j = base_config();
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
  expect(j, "'rope_scaling.rope_type' is 'yarn'");
  j = base_config();
  j["num_key_value_heads"] = 3;
  expect(j, "multiple of 'num_key_value_heads'");
  expect(nlohmann::json::array(), "not a JSON object");
  REQUIRE_THROWS_WITH(parse_llama_config("{oops", "cfg.json"), Catch::Contains("cfg.json"));
}

TEST_CASE("every problem of a config is reported at once", "[core][config]") {
  auto j = base_config();
  j.erase("hidden_size");
  j["vocab_size"] = "big";
  j["rope_parameters"] = {{"rope_type", "linear"}};
  try {
    parse(j);
    FAIL("no error");
  } catch (const ConfigError& e) {
    const std::string msg = e.what();
    REQUIRE_THAT(msg, Catch::Contains("'hidden_size' is missing"));
    REQUIRE_THAT(msg, Catch::Contains("'vocab_size' must be an integer"));
    REQUIRE_THAT(msg, Catch::Contains("'rope_parameters.factor' is missing"));
  }
}

TEST_CASE("the families' differences from LLaMA are read as transformers reads them",
          "[core][config]") {
  auto llama = base_config();
  llama["attention_bias"] = true;
  auto c = parse(llama);
  REQUIRE((c.qkv_bias && c.o_bias && !c.qk_norm && c.sliding_window == 0));

  auto qwen2 = base_config();
  qwen2["model_type"] = "qwen2";
  qwen2["sliding_window"] = 32;  // ignored unless use_sliding_window
  qwen2["use_sliding_window"] = false;
  c = parse(qwen2);
  REQUIRE((c.model_type == "qwen2" && c.qkv_bias && !c.o_bias && c.sliding_window == 0));
  qwen2["use_sliding_window"] = true;
  REQUIRE(parse(qwen2).sliding_window == 32);
  qwen2.erase("use_sliding_window");
  qwen2["layer_types"] = {"full_attention", "sliding_attention"};
  REQUIRE(parse(qwen2).sliding_window == 32);

  auto qwen3 = base_config();
  qwen3["model_type"] = "qwen3";
  qwen3["head_dim"] = 32;
  qwen3["attention_bias"] = false;
  qwen3["sliding_window"] = nullptr;
  c = parse(qwen3);
  REQUIRE((c.qk_norm && !c.qkv_bias && c.head_dim == 32 && c.sliding_window == 0));

  auto mistral = base_config();
  mistral["model_type"] = "mistral";
  mistral["sliding_window"] = 4096;
  mistral["attention_bias"] = true;  // MistralAttention has no bias whatever the config says
  c = parse(mistral);
  REQUIRE((c.sliding_window == 4096 && !c.qkv_bias && !c.o_bias));
  REQUIRE_NOTHROW(check_sliding_window(c, 4096, "eval"));
  REQUIRE_THROWS_WITH(check_sliding_window(c, 4097, "eval"),
                      Catch::Contains("sliding attention window of 4096"));
  mistral["sliding_window"] = nullptr;
  REQUIRE(parse(mistral).sliding_window == 0);
}
