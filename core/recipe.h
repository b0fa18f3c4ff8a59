// Training recipes: YAML as DESIGN.md specifies, `--set key.path=value` overrides, and
// validation that reports every problem at once, before any weights are loaded.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "adapters/peft_names.h"
#include "adapters/registry.h"

namespace lorafit {

struct DataRecipe {
  std::string train;
  std::string valid;            // optional
  std::string format = "text";  // text | alpaca | chat | tokens
  // chat: model (tokenizer_config.json's chat_template; llama2 without one), llama2, or a
  // Jinja file
  std::string chat_template = "model";
  int64_t max_seq_len = 512;
  // true: whole records share rows, each seeing itself only; concat (text): documents run
  // into each other in max_seq_len blocks; false: a record per row (datasets.h's Packing)
  std::string packing = "true";
  bool shuffle = true;  // false: file order, every epoch
  // Train past the model's max_position_embeddings without RoPE interpolation (a longlora
  // block interpolates): false refuses such a max_seq_len.
  bool allow_longer_context = false;
};

struct AdapterRecipe {
  std::string type = std::string(adapter_specs().front().name);
  int64_t r = 16;
  double alpha = 32;
  double dropout = 0.05;
  std::vector<std::string> targets = kProjectionKinds;
  bool use_rslora = false;
  std::string init;  // optional: a saved adapter to start from instead of PEFT's init
  // The strategies' own keys (adapter.<StrategyKey::name>), each at its default unless set.
  nlohmann::json options = AdapterSettings::strategy_defaults();
};

struct TrainRecipe {
  int64_t steps = 0;  // exactly one of steps and epochs is set
  int64_t epochs = 0;
  int64_t batch_size = 16;       // sequences per optimizer step (all ranks together)
  int64_t micro_batch_size = 4;  // sequences per forward/backward
  // Another way to say batch_size, as Hugging Face's Trainer does: micro-batches per optimizer
  // step on each rank (batch_size = this x micro_batch_size x WORLD_SIZE); 0: unused.
  int64_t gradient_accumulation_steps = 0;
  double lr = 2e-4;
  std::string schedule = "cosine";  // constant | linear | cosine
  int64_t warmup_steps = 20;
  double warmup_ratio = 0;  // > 0: warm up for ceil(ratio x total steps) instead
  double weight_decay = 0.0;
  double max_grad_norm = 1.0;  // 0 turns clipping off
  bool gradient_checkpointing = false;
  // What checkpointed layers keep for their recomputation: attention, residual and/or gate_up,
  // each in every layer or ("gate_up:14") in the first N (empty: everything is recomputed).
  std::vector<std::string> checkpoint_keep;
  // Replay each forward-backward pass whose batch layout repeats from a CUDA graph (one launch
  // for its thousands of kernels); CUDA only.
  bool cuda_graphs = false;
  int64_t log_every = 10;
  int64_t eval_every = 100;      // 0: no evaluation during training
  int64_t save_every = 200;      // 0: no checkpoints during training
  int64_t save_total_limit = 0;  // keep the newest N checkpoints (0: all)
};

// COLA (Chain of LoRA): knots where the adapter is merged into the base and restarted.
struct ColaRecipe {
  int64_t links = 0;                // 0: no chain; N: N links, knots evenly spaced
  std::vector<double> knots;        // or: knots at these fractions of the total steps (ascending)
  std::vector<int64_t> ranks;       // rank of each link (empty: adapter.r for all)
  std::string lr_restart = "none";  // none: one global schedule | rewarm: warm up after a knot
  bool enabled() const { return links > 0 || !knots.empty(); }
  /// Links in the chain: links, or one more than the knots.
  int64_t link_count() const {
    return knots.empty() ? links : static_cast<int64_t>(knots.size()) + 1;
  }
};

// LongLoRA: S2-Attn in training (full attention in eval, generate and merged checkpoints).
struct LongLoraRecipe {
  bool enabled = false;                // a longlora: block is in the recipe
  double group_ratio = 0.25;           // group size as a share of the sequence (the paper's 1/4)
  std::string shift = "roll";          // roll (the paper's) | nowrap | none
  std::vector<std::string> trainable;  // embed and/or norm: base tensors that train too
  // Linear RoPE position interpolation: auto (ceil(max_seq_len / max_position_embeddings))
  // or a factor >= 1.
  std::string rope_scale = "auto";
};

// Data parallelism (torchrun's environment picks the ranks; see core/distributed.h).
struct DistributedRecipe {
  int64_t timeout_s = 600;  // the longest wait for another rank: start-up, each collective
  double bucket_mb = 25;    // gradients per all-reduce
};

struct Recipe {
  std::string name;  // a job's name (jobs: several adapters on one base); empty for a plain recipe
  std::string model;
  std::string output;
  int64_t seed = 0;
  std::string device = "auto";
  std::string dtype = "auto";
  std::string quantize = "none";  // none | nf4: the frozen projection weights in 4 bits (QLoRA)
  DataRecipe data;
  AdapterRecipe adapter;
  TrainRecipe train;
  ColaRecipe cola;
  LongLoraRecipe longlora;
  DistributedRecipe distributed;
  // `jobs:` each job's resolved recipe: the top level with the job's own name, output, seed,
  // data, adapter and train keys over it. Empty: the recipe is its own one job.
  std::vector<Recipe> jobs;
  int64_t max_concurrent = 0;  // jobs training at once (0: all); the others wait their turn
};

/// The jobs a recipe trains: its `jobs`, or the recipe itself.
std::vector<Recipe> recipe_jobs(const Recipe& recipe);

/// One item of train.checkpoint_keep: "gate_up" (every checkpointed layer keeps it) or
/// "gate_up:14" (the first 14 layers do), so that a memory budget can hold part of a large
/// activation. `layers` is 0 for every layer; std::nullopt when the count is not a positive
/// integer.
struct CheckpointKeepItem {
  std::string what;
  int64_t layers = 0;
};
std::optional<CheckpointKeepItem> checkpoint_keep_item(const std::string& text);

/// Reads a recipe file ("-" for standard input), applies `overrides` ("data.max_seq_len=1024"),
/// and checks everything that can be checked without loading weights: unknown keys (with a
/// did-you-mean), types, ranges, files, and target modules against the model's config.json.
/// Throws one ConfigError listing every problem.
Recipe load_recipe(const std::string& path, const std::vector<std::string>& overrides = {});

/// `base` with `overrides` applied and checked like a recipe file, but without looking at
/// files (for `lorafit bench`, which has no model folder or dataset).
Recipe override_recipe(const Recipe& base, const std::vector<std::string>& overrides);

/// LongLoRA's linear RoPE interpolation factor for training at max_seq_len a model of
/// max_positions positions: 1 without a longlora block.
double rope_scale_factor(const LongLoraRecipe& longlora,
                         int64_t max_seq_len,
                         int64_t max_positions);

/// The adapter block as the strategy registry takes it.
AdapterSettings adapter_settings(const AdapterRecipe& adapter);

/// The resolved recipe as YAML: every key that applies to its strategy and modifiers, numbers
/// in their shortest exact form. Reading it back gives the same recipe.
std::string recipe_to_yaml(const Recipe& recipe);

/// A recipe from YAML text that recipe_to_yaml wrote (a run's recipe.yaml), checked like a
/// recipe file but without looking at files; `name` says where it came from.
Recipe parse_recipe_text(const std::string& yaml, const std::string& name);

/// The keys that --resume may change: the run's length, its log, eval and save cadence, where
/// it writes and runs. Any other difference would resume a different run.
const std::vector<std::string>& resume_changeable_keys();

/// "key: SAVED -> NOW" for every key, other than the changeable ones, in which `now` differs
/// from the `saved` recipe of the run it resumes.
std::vector<std::string> resume_differences(const Recipe& saved, const Recipe& now);

}  // namespace lorafit
