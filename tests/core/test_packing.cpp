// Packed rows (data.packing: true) compute exactly what their records compute alone: per-token
// losses and adapter gradients in float64, for text (a document longer than a row in chunks),
// alpaca and chat records, through LoRA, MixLoRA and two fused jobs, checkpointed or not.
#include <catch2/catch.hpp>

#include "adapters/job_routing.h"
#include "adapters/registry.h"
#include "core/adapter_io.h"
#include "core/batching.h"
#include "core/datasets.h"
#include "core/eval.h"
#include "core/llama.h"
#include "core/loss.h"
#include "test_util.h"

using namespace lorafit;
using lorafit::test::TempDir;

namespace {

const Tokenizer& tokenizer() {
  static const Tokenizer tok = load_tokenizer(lorafit::test::fixture("gqa_llama3/model"));
  return tok;
}

// Rows of 64 tokens (the fixture's tokenizer spends about one a character), 320 for alpaca
// (its prompt is about 130).
std::vector<Example> load(const std::string& jsonl, const std::string& format, Packing packing) {
  TempDir tmp;
  lorafit::test::write_text(tmp / "d.jsonl", jsonl);
  const int64_t row = format == "alpaca" ? 320 : 64;
  return load_examples(tmp / "d.jsonl", tokenizer(), {format, row, packing, {1}, 2, 320});
}

const std::vector<std::pair<std::string, std::string>>& datasets() {
  static const std::vector<std::pair<std::string, std::string>> sets = {
      {"text",  // the first document is longer than two rows
       "{\"text\": \"The cat sat on the mat and looked at the dog, who looked back at the cat "
       "for a long time, until the sun went down behind the hill and both of them slept.\"}\n"
       "{\"text\": \"A dog ran.\"}\n{\"text\": \"Birds sing in the morning.\"}\n"
       "{\"text\": \"It rained.\"}\n"},
      {"alpaca", R"({"instruction": "Name a bird.", "input": "", "output": "A sparrow."})"
                 "\n"
                 R"({"instruction": "Add.", "input": "2 and 3", "output": "5"})"
                 "\n"
                 R"({"instruction": "Say hi.", "input": "", "output": "Hi there, friend."})"
                 "\n"
                 R"({"instruction": "Count.", "input": "to three", "output": "One, two, three."})"
                 "\n"},
      {"chat",
       R"({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]})"
       "\n"
       R"({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Bye"},)"
       R"( {"role": "assistant", "content": "Bye now."}]})"
       "\n"
       R"({"messages": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}]})"
       "\n"
       R"({"messages": [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Me."}]})"
       "\n"
       R"({"messages": [{"role": "user", "content": "Up?"}, {"role": "assistant", "content": "Yes."}]})"
       "\n"}};
  return sets;
}

struct Setup {
  LlamaForCausalLM model{nullptr};
  JobRouting routing;
  std::vector<torch::Tensor> params;
};

// "lora" (all seven projections), "mixlora" (three experts, top 2) or "jobs" (both, fused),
// their weights random in float64 so that every one of them matters.
Setup setup(const std::string& what) {
  torch::manual_seed(11);
  Setup s;
  s.model = load_llama(lorafit::test::fixture("gqa_llama3/model"), torch::kCPU, torch::kFloat64);
  s.routing = route_jobs(s.model->adapter_sites(), what == "jobs" ? 2 : 1);
  AdapterSettings lora;
  lora.r = 2, lora.alpha = 4;
  lora.targets = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  AdapterSettings mix = lora;
  mix.targets = {"q_proj", "gate_proj", "down_proj"};
  mix.options["num_experts"] = 3, mix.options["top_k"] = 2;
  mix.options["expert_r"] = 2, mix.options["expert_alpha"] = 2.0;
  if (what != "mixlora") find_adapter("lora").attach_new(lora, s.routing.sites[0]);
  if (what != "lora") find_adapter("mixlora").attach_new(mix, s.routing.sites.back());
  s.routing.place_routers();
  torch::NoGradGuard no_grad;
  for (const auto& sites : s.routing.sites) {
    for (auto& p : trainable_parameters(s.model, sites)) {
      p.set_data(torch::randn_like(p, torch::kFloat64) * 0.2);  // float64, and B = 0 no more
      s.params.push_back(p);
    }
  }
  s.model->train();
  return s;
}

// log p(label t+1 | tokens ..t) at each position whose next label counts, else 0. [B, T]
torch::Tensor token_log_probs(LlamaForCausalLM& model, const Batch& batch) {
  const auto logp = torch::log_softmax(
      model->logits(model->forward(batch.ids, nullptr, batch.keep, batch.segments)),
      -1);                                       // [B, T, V]
  const auto next = next_targets(batch.labels);  // [B, T]
  return logp.gather(2, next.clamp_min(0).unsqueeze(2)).squeeze(2) * next.ge(0);
}

std::vector<torch::Tensor> grads(Setup& s) {
  std::vector<torch::Tensor> out;
  for (auto& p : s.params) {
    out.push_back(p.grad().defined() ? p.grad().clone() : torch::zeros_like(p));
    p.mutable_grad() = torch::Tensor();
  }
  return out;
}

}  // namespace

TEST_CASE("a packed batch gives each record what it gives alone", "[core][packing]") {
  for (const auto& [format, jsonl] : datasets()) {
    const auto rows = load(jsonl, format, Packing::Records);
    const auto single = load(jsonl, format, Packing::Pad);
    int64_t packed_rows = 0;
    for (const auto& r : rows) packed_rows += r.segments.size() > 1 ? 1 : 0;
    INFO(format << ": " << rows.size() << " rows, " << packed_rows << " of several records");
    REQUIRE(packed_rows > 0);
    REQUIRE(rows.size() >= 2);  // a row for each job
    for (const std::string what : {"lora", "mixlora", "jobs"}) {
      // 2: checkpointed, keeping the residual and (where no MixLoRA is) gate/up's output
      for (const int checkpoint : {0, 1, 2}) {
        INFO(format << ", " << what << ", checkpointed: " << checkpoint);
        auto s = setup(what);
        s.model->checkpoint_layers = checkpoint > 0;
        s.model->checkpoint_keep.residual = checkpoint == 2;
        s.model->checkpoint_keep.gate_up = checkpoint == 2;
        std::vector<size_t> all(rows.size());
        std::iota(all.begin(), all.end(), 0);
        // With jobs, job 0 has the first half of the rows and job 1 the rest.
        const auto half = static_cast<int64_t>(rows.size() / 2);
        auto job_of = [&](size_t row) { return what == "jobs" && row >= all.size() / 2 ? 1 : 0; };
        std::vector<BatchPart> parts{{&rows, {all.begin(), all.begin() + half}, 0},
                                     {&rows, {all.begin() + half, all.end()}, 1}};
        if (what != "jobs") parts = {{&rows, all, 0}};
        const auto batch = collate(parts, torch::kCPU);
        REQUIRE(batch.segments.defined());
        if (what == "jobs")
          s.routing.set_rows({{0, half}, {1, static_cast<int64_t>(rows.size()) - half}});
        const auto packed = token_log_probs(s.model, batch);  // [B, T]
        (-packed.sum()).backward();
        const auto packed_grads = grads(s);

        // Each record of each row alone, through its job's adapters.
        for (size_t r = 0; r < rows.size(); ++r) {
          std::vector<int64_t> lengths = rows[r].segments;
          if (lengths.empty()) lengths.push_back(static_cast<int64_t>(rows[r].input_ids.size()));
          int64_t at = 0;
          for (const auto n : lengths) {
            Example record;
            record.input_ids.assign(rows[r].input_ids.begin() + at,
                                    rows[r].input_ids.begin() + at + n);
            record.labels.assign(rows[r].labels.begin() + at, rows[r].labels.begin() + at + n);
            const std::vector<Example> one{record};
            s.routing.set_rows(JobRows::only(job_of(r)).spans);
            const auto alone = token_log_probs(s.model, collate({{&one, {0}, 0}}, torch::kCPU));
            REQUIRE(torch::allclose(packed[static_cast<int64_t>(r)].narrow(0, at, n), alone[0],
                                    1e-10, 1e-12));
            (-alone.sum()).backward();
            at += n;
          }
        }
        const auto alone_grads = grads(s);
        size_t trained = 0;  // an expert that no token of a few records picks gets none
        for (size_t i = 0; i < packed_grads.size(); ++i) {
          INFO("gradient " << i);
          trained += alone_grads[i].abs().sum().item<double>() > 0 ? 1 : 0;
          REQUIRE(torch::allclose(packed_grads[i], alone_grads[i], 1e-10, 1e-12));
        }
        REQUIRE(trained * 10 >= packed_grads.size() * 9);
      }
    }
    // The records' summed loss is the unpacked dataset's, as training and eval read it.
    auto s = setup("lora");
    std::vector<size_t> all(rows.size()), each(single.size());
    std::iota(all.begin(), all.end(), 0);
    std::iota(each.begin(), each.end(), 0);
    torch::NoGradGuard no_grad;
    const double packed_nll =
        nll_sum(s.model, collate({{&rows, all, 0}}, torch::kCPU)).item<double>();
    const double unpacked_nll =
        nll_sum(s.model, collate({{&single, each, 0}}, torch::kCPU)).item<double>();
    if (format != "text") {  // text: the long document is cut when unpacked, whole when packed
      REQUIRE(packed_nll == Approx(unpacked_nll).epsilon(1e-10));
      REQUIRE(target_count(rows, all) == target_count(single, each));
    }
  }
}

TEST_CASE("packed evaluation gives the unpacked loss and exact matches", "[core][packing]") {
  auto s = setup("lora");
  for (const auto& [format, jsonl] : datasets()) {
    INFO(format);
    const auto examples = load(jsonl, format, Packing::Pad);
    const auto plain = evaluate(s.model, examples, 2);
    const auto packed = evaluate(s.model, examples, 2, /*packing=*/true);
    REQUIRE(plain.tokens > 0);
    REQUIRE(packed.loss == Approx(plain.loss).epsilon(1e-10));
    REQUIRE(packed.tokens == plain.tokens);
    REQUIRE(packed.records == plain.records);
    REQUIRE(packed.exact == plain.exact);
  }
}
