// Several jobs' adapters on one model: a fused batch gives each job's rows exactly what those
// rows give through that job's adapters alone, values and gradients.
#include <catch2/catch.hpp>
#include <set>

#include "adapters/job_routing.h"
#include "adapters/registry.h"
#include "core/adapter_io.h"
#include "core/llama.h"
#include "test_util.h"

using namespace lorafit;

namespace {

struct ThreeJobs {
  LlamaForCausalLM model{nullptr};
  JobRouting routing;
  std::vector<std::vector<torch::Tensor>> params;  // per job
};

// Places the routers, gives every job's parameters random float64 values (B = 0 no more) and
// sets the model training.
void start_training(ThreeJobs& t) {
  t.routing.place_routers();
  for (size_t j = 0; j < t.routing.sites.size(); ++j) {
    t.params.push_back(trainable_parameters(t.model, t.routing.sites[j]));
    torch::NoGradGuard no_grad;
    for (auto& p : t.params.back()) p.set_data(torch::randn_like(p, torch::kFloat64) * 0.2);
  }
  t.model->train();
}

// lora on q and v; multilora on everything; mixlora with a LoRA on q; a job with nothing;
// dora on attention and down.
ThreeJobs three_jobs() {
  torch::manual_seed(3);
  ThreeJobs t;
  t.model = load_llama(lorafit::test::fixture("gqa_llama3/model"), torch::kCPU, torch::kFloat64);
  t.routing = route_jobs(t.model->adapter_sites(), 5);
  AdapterSettings lora;
  lora.r = 2, lora.alpha = 4, lora.targets = {"q_proj", "v_proj"};
  AdapterSettings multi = lora;
  multi.options["n"] = 2;
  multi.targets = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  AdapterSettings mix = lora;
  mix.targets = {"q_proj", "gate_proj", "down_proj"};
  mix.options["num_experts"] = 3, mix.options["top_k"] = 2;
  mix.options["expert_r"] = 2, mix.options["expert_alpha"] = 2.0;
  find_adapter("lora").attach_new(lora, t.routing.sites[0]);
  find_adapter("multilora").attach_new(multi, t.routing.sites[1]);
  find_adapter("mixlora").attach_new(mix, t.routing.sites[2]);
  AdapterSettings dora = lora;
  dora.targets = {"q_proj", "k_proj", "v_proj", "o_proj", "down_proj"};
  find_adapter("dora").attach_new(dora, t.routing.sites[4]);
  start_training(t);
  return t;
}

std::vector<torch::Tensor> grads_of(const ThreeJobs& t) {
  std::vector<torch::Tensor> out;
  for (const auto& job : t.params)
    for (const auto& p : job)
      out.push_back(p.grad().defined() ? p.grad().clone() : torch::zeros_like(p));
  return out;
}

void clear_grads(ThreeJobs& t) {
  for (auto& job : t.params)
    for (auto& p : job) p.mutable_grad() = torch::Tensor();
}

}  // namespace

TEST_CASE("a fused batch gives each job what its rows give alone", "[adapters][jobs]") {
  for (const bool checkpoint : {false, true}) {
    INFO("checkpointed layers: " << checkpoint);
    auto t = three_jobs();
    t.model->checkpoint_layers = checkpoint;
    // Rows in an order unlike the jobs' (job 1, 0, 3, 4, 2), one row of job 0.
    const std::vector<JobRows::Span> spans = {{1, 2}, {0, 1}, {3, 1}, {4, 2}, {2, 2}};
    const auto ids = torch::randint(3, 320, {8, 9}, torch::kInt64);
    const auto weight = torch::randn({8, 9, t.model->config.hidden_size}, torch::kFloat64);

    t.routing.set_rows(spans);
    const auto fused = t.model->forward(ids);  // [8, 9, C]
    (fused * weight).sum().backward();
    const auto fused_grads = grads_of(t);

    clear_grads(t);
    std::vector<torch::Tensor> alone;
    int64_t row = 0;
    for (const auto& s : spans) {
      t.routing.set_rows({{s.job, 0}});
      alone.push_back(t.model->forward(ids.narrow(0, row, s.rows)));
      // The job without adapters has nothing to train.
      if (alone.back().requires_grad())
        (alone.back() * weight.narrow(0, row, s.rows)).sum().backward();
      row += s.rows;
    }
    REQUIRE(torch::allclose(fused, torch::cat(alone, 0), 1e-10, 1e-12));
    lorafit::test::require_same_gradients(grads_of(t), fused_grads);
  }
}

TEST_CASE("the router's per-job path equals its stacked low-rank path", "[adapters][jobs]") {
  auto t = three_jobs();
  t.routing.set_rows({{2, 1}, {1, 3}, {3, 1}, {0, 2}});
  for (auto& router : t.routing.projection_routers) {
    const auto& view = router->jobs.front();
    const auto x = torch::randn({7, 4, view->in_features}, torch::kFloat64);
    const auto base = torch::nn::functional::linear(x, view->weight);
    const auto f = router->low_rank();
    REQUIRE(f);
    const auto stacked = low_rank_linear(x, view->weight, *f);
    INFO(view->name);
    REQUIRE(torch::allclose(router->forward(x, base), stacked, 1e-12, 1e-12));
  }
}

TEST_CASE("each job trains only its own adapters", "[adapters][jobs]") {
  auto t = three_jobs();
  std::set<const void*> seen;
  for (size_t j = 0; j < 3; ++j) {
    REQUIRE(!t.params[j].empty());
    for (const auto& p : t.params[j]) REQUIRE(seen.insert(p.unsafeGetTensorImpl()).second);
  }
  REQUIRE(t.params[3].empty());
  for (const auto& p : t.model->parameters()) REQUIRE_FALSE(p.requires_grad());
}

TEST_CASE("jobs alike in shape run as one batch of GEMMs and give what they give alone",
          "[adapters][jobs]") {
  // Jobs on every projection with other ranks and scalings (LoRA r=2, r=4 and r=3, MultiLoRA
  // 2 x r=2) and as many rows each: the projections batch them, each rank padded to the
  // largest; a DoRA job among them (which does not batch) splits them into two batches.
  // Values and gradients are those of each job's rows alone.
  for (const bool checkpoint : {false, true}) {
    INFO("checkpointed layers: " << checkpoint);
    torch::manual_seed(5);
    ThreeJobs t;
    t.model = load_llama(lorafit::test::fixture("gqa_llama3/model"), torch::kCPU, torch::kFloat64);
    t.model->checkpoint_layers = checkpoint;
    // o_proj's batch without its value, and gate/up's from their kept output.
    t.model->checkpoint_keep.residual = checkpoint;
    t.model->checkpoint_keep.gate_up = checkpoint;
    t.routing = route_jobs(t.model->adapter_sites(), 5);
    AdapterSettings s;
    s.targets = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
    s.r = 2, s.alpha = 4;
    find_adapter("lora").attach_new(s, t.routing.sites[0]);
    s.r = 4, s.alpha = 2;
    find_adapter("lora").attach_new(s, t.routing.sites[1]);
    s.r = 2, s.alpha = 3, s.options["n"] = 2, s.options["scale"] = "vector";
    find_adapter("multilora").attach_new(s, t.routing.sites[2]);
    s.options.clear();
    find_adapter("dora").attach_new(s, t.routing.sites[3]);
    s.r = 3, s.alpha = 6;
    find_adapter("lora").attach_new(s, t.routing.sites[4]);
    start_training(t);
    const std::vector<JobRows::Span> spans = {{2, 2}, {0, 2}, {3, 2}, {1, 2}, {4, 2}};
    const auto ids = torch::randint(3, 320, {10, 7}, torch::kInt64);
    const auto weight = torch::randn({10, 7, t.model->config.hidden_size}, torch::kFloat64);
    t.routing.set_rows(spans);
    const auto fused = t.model->forward(ids);
    (fused * weight).sum().backward();
    const auto fused_grads = grads_of(t);
    clear_grads(t);
    std::vector<torch::Tensor> alone;
    for (size_t i = 0; i < spans.size(); ++i) {
      t.routing.set_rows({{spans[i].job, 0}});
      alone.push_back(t.model->forward(ids.narrow(0, 2 * i, 2)));
      (alone.back() * weight.narrow(0, 2 * i, 2)).sum().backward();
    }
    REQUIRE(torch::allclose(fused, torch::cat(alone, 0), 1e-10, 1e-12));
    lorafit::test::require_same_gradients(grads_of(t), fused_grads);
  }
}
