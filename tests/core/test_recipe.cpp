#include <catch2/catch.hpp>

#include "core/errors.h"
#include "core/recipe.h"
#include "core/trainer.h"
#include "test_util.h"

using namespace lorafit;
using lorafit::test::TempDir;

namespace {

// A valid recipe (paths relative to the repository root, the tests' working directory).
std::string base_recipe() {
  return R"(model: tests/fixtures/gqa_llama3/model
output: runs/x
data:
  train: recipes/data/tiny_train.jsonl
  format: text
  max_seq_len: 32
adapter:
  r: 4
  alpha: 8
train:
  steps: 10
  batch_size: 4
  micro_batch_size: 2
)";
}

Recipe load_text(const std::string& yaml, const std::vector<std::string>& overrides = {}) {
  TempDir tmp;
  lorafit::test::write_text(tmp / "r.yaml", yaml);
  return load_recipe(tmp / "r.yaml", overrides);
}

}  // namespace

TEST_CASE("the shipped recipes validate", "[core][recipe]") {
  for (const auto& e : std::filesystem::directory_iterator("recipes")) {
    if (e.path().extension() != ".yaml") continue;
    INFO(e.path());
    REQUIRE_NOTHROW(load_recipe(e.path().string()));
  }
}

TEST_CASE("a recipe reads its keys and keeps the defaults of the rest", "[core][recipe]") {
  const auto r = load_text(base_recipe());
  REQUIRE(r.data.max_seq_len == 32);
  REQUIRE(r.adapter.r == 4);
  REQUIRE(r.adapter.alpha == 8);
  REQUIRE(r.adapter.targets.size() == 7);
  REQUIRE(r.train.schedule == "cosine");
  REQUIRE(r.train.lr == 2e-4);
}

TEST_CASE("overrides with --set reach any key by its dotted path", "[core][recipe]") {
  const auto r = load_text(
      base_recipe(), {"data.max_seq_len=200", "adapter.targets=[q_proj, v_proj]", "train.lr=1e-3",
                      "seed=7", "data.valid=recipes/data/tiny_valid.jsonl"});
  REQUIRE(r.data.max_seq_len == 200);
  REQUIRE(r.adapter.targets == std::vector<std::string>{"q_proj", "v_proj"});
  REQUIRE(r.train.lr == 1e-3);
  REQUIRE(r.seed == 7);
  REQUIRE(r.data.valid == "recipes/data/tiny_valid.jsonl");
}

TEST_CASE("the resolved recipe reads back as the same recipe", "[core][recipe]") {
  const auto r =
      load_text(base_recipe(), {"adapter.targets=all-linear", "train.warmup_steps=3",
                                "train.gradient_checkpointing=true",
                                "train.checkpoint_keep=[attention, residual, gate_up:3]"});
  REQUIRE(r.train.checkpoint_keep ==
          std::vector<std::string>{"attention", "residual", "gate_up:3"});
  const auto yaml = recipe_to_yaml(r);
  REQUIRE(recipe_to_yaml(load_text(yaml)) == yaml);
}

TEST_CASE("broken recipes name the key that is wrong", "[core][recipe]") {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"adapter.rank=8"}, "unknown key 'adapter.rank' (did you mean 'adapter.r'?)"},
      {{"trian.steps=3"}, "unknown key 'trian'"},
      {{"train.lr=fast"}, "'train.lr' must be a number"},
      {{"train.lr=-1"}, "'train.lr' must be > 0"},
      {{"adapter.r=0"}, "'adapter.r' must be >= 1"},
      {{"adapter.dropout=1.5"}, "'adapter.dropout' must be in [0, 1)"},
      {{"data.format=alpacca"},
       "'data.format' is 'alpacca', expected text | alpaca | chat | tokens (did you mean "
       "'alpaca'?)"},
      {{"train.schedule=cosin"}, "(did you mean 'cosine'?)"},
      {{"adapter.type=lorra"}, "'adapter.type' is 'lorra'"},
      {{"adapter.targets=[q_proj, qkv_proj]"}, "the model has no module 'qkv_proj'"},
      {{"data.train=missing.jsonl"}, "'data.train': file 'missing.jsonl' does not exist"},
      {{"model=nowhere"}, "'model': 'nowhere' is not a Hugging Face model folder"},
      {{"train.epochs=2"}, "set exactly one of 'train.steps' and 'train.epochs'"},
      {{"train.micro_batch_size=3"}, "must be a multiple of 'train.micro_batch_size' (3)"},
      {{"data.packing=maybe"}, "'data.packing' is 'maybe', expected true | false | concat"},
      {{"jobs=5"}, "'jobs' must be a list of jobs"},
      {{"jobs=[{adapter: {r: 2}}]"}, "jobs[0]: 'name' is required"},
      {{"jobs=[{name: a, dtype: bf16}]"}, "job 'a': 'dtype' is shared by all jobs"},
      {{"jobs=[{name: a, trian: {}}]"}, "job 'a': unknown key 'trian' (did you mean 'train'?)"},
      {{"longlora.group_ratio=0.3", "data.packing=concat"},
       "is not a whole, even number of tokens per group"},
      {{"longlora.group_ratio=0.3"}, "which needs 2 / group_ratio to be whole"},
      {{"data.packing=concat", "data.format=alpaca"},
       "'data.packing' concat runs text documents into each other"},
      {{"longlora.shift=rol"}, "(did you mean 'roll'?)"},
      {{"longlora.rope_scale=0.5"}, "expected auto or a factor >= 1"},
      {{"longlora.trainable=[embed, norms]"}, "lists 'norms', expected embed and/or norm"},
      {{"train.gradient_checkpointing=true", "train.checkpoint_keep=[attention, residul]"},
       "lists 'residul', expected any of attention, residual and gate_up (did you mean "
       "'residual'?)"},
      {{"train.gradient_checkpointing=true", "train.checkpoint_keep=[residual, residual]"},
       "'train.checkpoint_keep' lists 'residual' twice"},
      {{"train.gradient_checkpointing=true", "train.checkpoint_keep=[residual, gate_up:0]"},
       "lists 'gate_up:0', whose layer count after ':' is not a positive integer"},
      {{"train.gradient_checkpointing=true", "train.checkpoint_keep=[gate_up:half]"},
       "lists 'gate_up:half', whose layer count"},
      {{"train.gradient_checkpointing=true", "train.checkpoint_keep=[gate_upp:4]"},
       "lists 'gate_upp', expected any of attention, residual and gate_up (did you mean "
       "'gate_up'?)"},
      {{"train.gradient_checkpointing=true", "train.checkpoint_keep=[gate_up, gate_up:4]"},
       "'train.checkpoint_keep' lists 'gate_up' twice"},
      {{"train.gradient_checkpointing=true", "train.checkpoint_keep=[residual, gate_up: 4]"},
       "'train.checkpoint_keep' must list names (line 1) (hint: 'name: value' with a space is a "
       "map; a layer count is written gate_up:14)"},
      {{"train.checkpoint_keep=[attention]"}, "train.gradient_checkpointing is false"},
      {{"train.gradient_checkpointing=true",
        "jobs=[{name: a}, {name: b, train: {checkpoint_keep: [attention]}}]"},
       "job 'b': 'train.checkpoint_keep' is shared by all jobs"},
      {{"train.cuda_graphs=true", "train.gradient_checkpointing=true", "adapter.dropout=0.1"},
       "'train.cuda_graphs' with train.gradient_checkpointing needs adapter.dropout 0"},
      {{"train.cuda_graphs=true", "adapter.type=mixlora", "adapter.num_experts=4",
        "adapter.top_k=2", "adapter.router_aux_loss_coef=0.01"},
       "'train.cuda_graphs': adapter.type mixlora routes each token"},
      {{"train.cuda_graphs=true", "cola.links=2"}, "'train.cuda_graphs' with cola"},
      {{"jobs=[{name: a}, {name: b, train: {cuda_graphs: true}}]"},
       "job 'b': 'train.cuda_graphs' is shared by all jobs"},
      {{"cola.knots=[0.5, 0.3]"}, "'cola.knots' must be ascending fractions"},
      {{"cola.knots=0.5"}, "'cola.knots' must be a list of numbers"},
      {{"cola.links=3", "cola.ranks=[8, 4]"}, "'cola.ranks' lists 2 ranks for a chain of 3"},
      {{"cola.lr_restart=rewarn"}, "(did you mean 'rewarm'?)"},
      {{"train=5"}, "'train' must be a mapping of keys"},
      {{"data.chat_template=llama2"}, "'data.chat_template' is set but data.format is 'text'"},
      {{"data.format=chat", "data.chat_template=no/such.jinja"},
       "'data.chat_template': 'no/such.jinja' is neither model, llama2 nor a template file"},
  };
  for (const auto& [overrides, fragment] : cases) {
    INFO(overrides[0]);
    REQUIRE_THROWS_WITH(load_text(base_recipe(), overrides), Catch::Contains(fragment));
  }
}

TEST_CASE("every problem of a recipe is reported at once", "[core][recipe]") {
  try {
    load_text(base_recipe(), {"adapter.rank=8", "train.lr=fast", "data.train=missing.jsonl"});
    FAIL("no error");
  } catch (const ConfigError& e) {
    const std::string msg = e.what();
    REQUIRE_THAT(msg, Catch::Contains("has 3 problems"));
    REQUIRE_THAT(msg, Catch::Contains("adapter.rank") && Catch::Contains("train.lr") &&
                          Catch::Contains("missing.jsonl"));
  }
}

TEST_CASE("a recipe that is not YAML is refused with its path", "[core][recipe]") {
  REQUIRE_THROWS_WITH(load_text("model: [unclosed"), Catch::Contains("is not valid YAML"));
  REQUIRE_THROWS_WITH(load_recipe("no/such/recipe.yaml"),
                      Catch::Contains("cannot read recipe 'no/such/recipe.yaml'"));
}

namespace {

const std::string kTwoJobs = R"(
max_concurrent: 1
jobs:
  - name: small
    adapter: {r: 2, targets: [q_proj, v_proj]}
    train: {lr: 1.0e-3}
  - name: big
    output: elsewhere/big
    seed: 5
    adapter: {type: multilora, n: 2}
    data: {max_seq_len: 48}
    train: {steps: 20, batch_size: 8}
)";

}  // namespace

TEST_CASE("jobs inherit the top level and override it key by key", "[core][recipe]") {
  const auto r = load_text(base_recipe() + kTwoJobs);
  REQUIRE(r.max_concurrent == 1);
  REQUIRE(r.jobs.size() == 2);
  const auto& small = r.jobs[0];
  const auto& big = r.jobs[1];
  REQUIRE(small.name == "small");
  REQUIRE(small.output == "runs/x/small");
  REQUIRE(small.adapter.r == 2);
  REQUIRE(small.adapter.alpha == 8);  // from the top
  REQUIRE(small.adapter.targets == std::vector<std::string>{"q_proj", "v_proj"});
  REQUIRE(small.train.lr == 1e-3);
  REQUIRE(small.train.steps == 10);
  REQUIRE(small.data.max_seq_len == 32);
  REQUIRE(big.output == "elsewhere/big");
  REQUIRE(big.seed == 5);
  REQUIRE(small.seed == 0);
  REQUIRE(big.adapter.type == "multilora");
  REQUIRE(big.adapter.r == 4);
  REQUIRE(big.data.max_seq_len == 48);
  REQUIRE(big.data.train == "recipes/data/tiny_train.jsonl");
  REQUIRE(big.train.batch_size == 8);
  REQUIRE(big.train.micro_batch_size == 2);
  REQUIRE(recipe_jobs(r).size() == 2);
  REQUIRE(recipe_jobs(load_text(base_recipe())).size() == 1);

  // The resolved recipe spells each job out and reads back as the same jobs; each job's own
  // resolved recipe is a plain recipe that trains that job alone.
  const auto again = load_text(recipe_to_yaml(r));
  REQUIRE(recipe_to_yaml(again) == recipe_to_yaml(r));
  for (size_t i = 0; i < 2; ++i) {
    const auto alone = load_text(recipe_to_yaml(r.jobs[i]));
    REQUIRE(alone.jobs.empty());
    REQUIRE(recipe_to_yaml(alone) == recipe_to_yaml(r.jobs[i]));
  }
}

TEST_CASE("a bad job is named; a problem of the shared top level is reported once",
          "[core][recipe]") {
  const std::string jobs = R"(
jobs:
  - name: a
    data: {train: missing.jsonl}
  - name: b
    adapter: {type: lorra}
  - name: c
  - name: c
    output: runs/x/a
    adapter: {type: full}
)";
  try {
    load_text(base_recipe() + jobs, {"train.lr=fast", "cola.links=2"});
    FAIL("no error");
  } catch (const ConfigError& e) {
    const std::string msg = e.what();
    INFO(msg);
    REQUIRE_THAT(msg,
                 Catch::Contains("job 'a': 'data.train': file 'missing.jsonl' does not exist"));
    REQUIRE_THAT(msg, Catch::Contains("job 'b': 'adapter.type' is 'lorra'"));
    REQUIRE_THAT(msg, Catch::Contains("two jobs are named 'c'"));
    REQUIRE_THAT(msg, Catch::Contains("output 'runs/x/a' is another job's too"));
    REQUIRE_THAT(msg, Catch::Contains("adapter.type full trains the base, which the jobs share"));
    REQUIRE_THAT(msg, Catch::Contains("'cola' merges adapters into the base"));
    // Every job inherits the bad learning rate: one report, without a job's name.
    REQUIRE_THAT(msg, Catch::Contains("problems: 'train.lr' must be a number"));
    REQUIRE_THAT(msg, !Catch::Contains("job 'a': 'train.lr'"));
  }
}

TEST_CASE("a key given twice is an error that names both lines", "[core][recipe]") {
  const std::string yaml = base_recipe() + "seed: 1\nadapter:\n  r: 2\nseed: 2\n";
  REQUIRE_THROWS_WITH(load_text(yaml), Catch::Contains("'seed' is given twice (lines 14 and 17)") &&
                                           Catch::Contains("'adapter' is given twice"));
  REQUIRE_THROWS_WITH(load_text(base_recipe() + "jobs:\n  - name: a\n    seed: 1\n    seed: 2\n"),
                      Catch::Contains("'jobs[0].seed' is given twice"));
}

TEST_CASE("the resolved recipe shows what applies, numbers as written, and reads back",
          "[core][recipe]") {
  const auto lora = load_text(base_recipe(), {"train.lr=0.005", "adapter.dropout=0.1"});
  const auto yaml = recipe_to_yaml(lora);
  REQUIRE_THAT(yaml, Catch::Contains("lr: 0.005\n") && Catch::Contains("dropout: 0.1\n"));
  for (const char* other : {"num_experts", "top_k", "scale:", "cola", "longlora", "expert_",
                            "distributed", "epochs", "warmup_ratio", "valid"}) {
    INFO(other);
    REQUIRE_THAT(yaml, !Catch::Contains(other));
  }
  REQUIRE(recipe_to_yaml(parse_recipe_text(yaml, "recipe.yaml")) == yaml);
  const auto mix =
      load_text(base_recipe(), {"adapter.type=mixlora", "adapter.router_aux_loss_coef=0.01"});
  REQUIRE_THAT(recipe_to_yaml(mix), Catch::Contains("num_experts: 8") &&
                                        Catch::Contains("router_aux_loss_coef: 0.01\n") &&
                                        !Catch::Contains("scale:"));
}

TEST_CASE("a resume may change the run's length and cadence, nothing else", "[core][recipe]") {
  const auto saved = load_text(base_recipe());
  const auto same = load_text(base_recipe(), {"train.steps=50", "train.save_every=5",
                                              "train.log_every=1", "output=runs/y", "device=cpu"});
  REQUIRE(resume_differences(saved, same).empty());
  const auto changed =
      load_text(base_recipe(), {"train.lr=1e-3", "adapter.targets=[q_proj]", "train.steps=50"});
  REQUIRE(resume_differences(saved, changed) ==
          std::vector<std::string>{
              "adapter.targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj] -> "
              "[q_proj]",
              "train.lr: 0.0002 -> 0.001"});
  // A strategy's knobs count once the strategy is chosen.
  REQUIRE(resume_differences(saved, load_text(base_recipe(), {"adapter.n=5"})).empty());
}

TEST_CASE("warmup and the batch can each be said one of two ways, not both", "[core][recipe]") {
  const auto ratio = load_text(base_recipe(), {"train.warmup_ratio=0.1"});
  REQUIRE(warmup_steps(ratio.train, 95) == 10);  // ceil(9.5), as Hugging Face's Trainer
  REQUIRE(warmup_steps(load_text(base_recipe()).train, 95) == 20);
  REQUIRE_THROWS_WITH(load_text(base_recipe(), {"train.warmup_ratio=0.1", "train.warmup_steps=5"}),
                      Catch::Contains("set one of 'train.warmup_steps' and 'train.warmup_ratio'"));
  REQUIRE_THROWS_WITH(load_text(base_recipe(), {"train.gradient_accumulation_steps=2"}),
                      Catch::Contains("set one of 'train.batch_size' and "
                                      "'train.gradient_accumulation_steps'"));
  std::string no_batch = base_recipe();
  no_batch.replace(no_batch.find("  batch_size: 4\n"), 16, "");
  const auto gas = load_text(no_batch, {"train.gradient_accumulation_steps=3"});
  REQUIRE(gas.train.gradient_accumulation_steps == 3);
  REQUIRE_THAT(recipe_to_yaml(gas), Catch::Contains("gradient_accumulation_steps: 3") &&
                                        !Catch::Contains("\n  batch_size: "));
}

TEST_CASE("checkpoint_keep's layer counts reach the layers they name", "[core][recipe]") {
  const auto r = load_text(base_recipe(), {"train.gradient_checkpointing=true",
                                           "train.checkpoint_keep=[residual, gate_up:1]"});
  auto model = load_llama(r.model, torch::kCPU, torch::kFloat32);
  use_recipe_layers(model, r);
  REQUIRE(model->checkpoint_layers);
  const auto first = model->checkpoint_keep.in_layer(0),
             second = model->checkpoint_keep.in_layer(1);
  REQUIRE((first.residual && first.gate_up && !first.attention));
  REQUIRE((second.residual && !second.gate_up && !second.attention));
}
