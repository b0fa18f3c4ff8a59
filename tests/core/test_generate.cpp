#include <catch2/catch.hpp>

#include "core/datasets.h"
#include "core/eval.h"
#include "core/generate.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"

using namespace lorafit;
using lorafit::test::fixture;

namespace {

LlamaForCausalLM tiny() {
  return load_llama(fixture("gqa_llama3/model"), torch::kCPU, torch::kFloat32);
}

}  // namespace

TEST_CASE("a KV cache gives the logits of the full sequence", "[core][generate]") {
  for (const char* name : {"gqa_llama3", "mha_linear"}) {
    INFO(name);
    auto model = load_llama(fixture(std::string(name) + "/model"), torch::kCPU, torch::kFloat32);
    torch::NoGradGuard no_grad;
    auto ids = torch::randint(3, 320, {2, 12}, torch::kInt64);
    auto full = model->logits(model->forward(ids));  // [2, 12, V]
    KVCache cache;
    // A prefill of 5 positions, a block of 4 after it (masked attention over the cache),
    // then single positions.
    std::vector<torch::Tensor> parts{model->logits(model->forward(ids.narrow(1, 0, 5), &cache))};
    parts.push_back(model->logits(model->forward(ids.narrow(1, 5, 4), &cache)));
    for (int64_t t = 9; t < 12; ++t)
      parts.push_back(model->logits(model->forward(ids.narrow(1, t, 1), &cache)));
    REQUIRE(cache.length == 12);
    REQUIRE(lorafit::test::rel_err(torch::cat(parts, 1), full) < 1e-5);
  }
}

TEST_CASE("greedy generation picks the argmax of the whole sequence at each step",
          "[core][generate]") {
  auto model = tiny();
  const std::vector<int64_t> prompt{1, 273, 312, 286};
  GenerateOptions o;
  o.max_new_tokens = 10;
  const auto out = generate(model, prompt, o);
  torch::NoGradGuard no_grad;
  std::vector<int64_t> seq = prompt;
  for (auto token : out) {
    auto logits = model->logits(model->forward(torch::tensor(seq, torch::kInt64).unsqueeze(0)));
    REQUIRE(logits[0][-1].argmax().item<int64_t>() == token);
    seq.push_back(token);
  }
  REQUIRE(out.size() <= 10);
}

TEST_CASE("sampling is seeded and top-p keeps only the most likely tokens", "[core][generate]") {
  auto model = tiny();
  GenerateOptions o;
  o.max_new_tokens = 8;
  o.temperature = 1.0;
  o.seed = 11;
  const auto a = generate(model, {1, 273}, o), b = generate(model, {1, 273}, o);
  REQUIRE(a == b);
  o.seed = 12;
  REQUIRE(generate(model, {1, 273}, o) != a);

  auto logits = torch::tensor({0.0, 3.0, 1.0, 2.5});  // softmax: 0.028, 0.558, 0.076, 0.338
  auto gen = torch::make_generator<at::CPUGeneratorImpl>(0);
  GenerateOptions nucleus;
  nucleus.temperature = 1.0;
  nucleus.top_p = 0.5;  // the top token alone reaches 0.5
  for (int i = 0; i < 20; ++i) REQUIRE(pick_token(logits, nucleus, gen) == 1);
  nucleus.top_p = 0.85;  // the top two
  std::set<int64_t> seen;
  for (int i = 0; i < 50; ++i) seen.insert(pick_token(logits, nucleus, gen));
  REQUIRE(seen == std::set<int64_t>{1, 3});
}

TEST_CASE("greedy generation prints transformers' continuation token for token",
          "[core][generate]") {
  // trained_tiny was trained by transformers, which also recorded its greedy continuations.
  auto model = load_llama(fixture("trained_tiny/model"), torch::kCPU, torch::kFloat32);
  const auto expected = lorafit::test::read_json(fixture("trained_tiny/expected.json"));
  const auto tokenizer = load_tokenizer(fixture("trained_tiny/model"));
  GenerateOptions o;
  o.max_new_tokens = 12;
  for (const auto& case_ : expected["greedy"]) {
    INFO(case_["prompt"]);
    std::vector<int64_t> prompt{1};
    for (auto id : tokenizer.encode(case_["prompt"])) prompt.push_back(id);
    REQUIRE(nlohmann::json(prompt) == case_["prompt_ids"]);
    REQUIRE(nlohmann::json(generate(model, prompt, o)) == case_["new_ids"]);
  }
}

TEST_CASE("stories260K: lorafit's loss and greedy text are llama2.c's run.c's",
          "[core][generate]") {
  // tests/fixtures/stories260k/expected.json: scripts/stories260k_reference.py ran llama2.c's
  // run.c on the shipped model converted back to llama2.c's format (q/k rows interleaved again).
  const auto expected = lorafit::test::read_json(fixture("stories260k/expected.json"));
  auto model = load_llama(lorafit::test::stories260k(), torch::kCPU, torch::kFloat32);
  const auto tokenizer = load_tokenizer(lorafit::test::stories260k());
  REQUIRE(nlohmann::json(tokenizer.encode(expected["story"], true)) == expected["story_ids"]);
  const auto ids = expected["story_ids"].get<std::vector<int64_t>>();
  const auto result = evaluate(model, {Example{ids, ids, {}}}, 1);
  REQUIRE(result.tokens == expected["tokens"].get<int64_t>());
  REQUIRE(std::abs(result.loss - expected["loss"].get<double>()) < 1e-5 * result.loss);
  GenerateOptions o;
  o.max_new_tokens = static_cast<int64_t>(expected["greedy_ids"].size());
  const auto prompt = tokenizer.encode(expected["prompt"], true);
  REQUIRE(nlohmann::json(prompt) == expected["prompt_ids"]);
  REQUIRE(nlohmann::json(generate(model, prompt, o)) == expected["greedy_ids"]);
}
