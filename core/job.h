// A job of a training run, and its lifecycle: the recipe's jobs resolved, each one's data read,
// its adapter attached, its optimizer built, resumed from a checkpoint, checkpointed, and its
// outputs written when it finishes. COLA's knots and rewarm come in through two hooks. The
// step loop that trains the jobs together is core/trainer.cpp's.
#pragma once

#include <chrono>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "adapters/strategy.h"
#include "core/adapter_io.h"
#include "core/checkpoint.h"
#include "core/cola.h"
#include "core/datasets.h"
#include "core/distributed.h"
#include "core/llama.h"
#include "core/loss.h"
#include "core/loss_plot.h"
#include "core/optimizer.h"
#include "core/recipe.h"
#include "tokenizer/tokenizer.h"

namespace lorafit {

using Clock = std::chrono::steady_clock;

/// One job of a run: its recipe, data, adapter and optimizer, and where it stands.
struct Job {
  enum class Status { Waiting, Running, Done, Failed, Stopped };

  Recipe recipe;       // the job's resolved recipe
  size_t index = 0;    // its slot in the routing
  std::string prefix;  // before its log lines: "[name] " when it shares the run
  std::filesystem::path out;
  const AdapterSpec* spec = nullptr;
  AdapterSettings settings;
  AdapterSites sites;  // where its adapters attach
  std::vector<Example> train_examples, valid_examples;
  size_t train_records = 0;
  std::filesystem::path checkpoint;  // to resume from; empty: from the start
  TrainerState resume_state;         // the checkpoint's
  int64_t finished_step = -1;        // where an earlier run of the job finished (job_state.json)
  int64_t saved_step = -1;           // of the job's newest checkpoint
  int64_t total_steps = 0;
  int64_t micro_batches = 1;  // per optimizer step, on this rank
  // COLA: knots split the steps into links, each with its own (maybe smaller) adapter.
  std::vector<int64_t> knots;
  size_t link = 0;  // knots tied so far
  ColaChain chain;
  AuxLoss aux_loss;
  // Base tensors that train: all of them (full fine-tuning), or LongLoRA's embeddings and
  // norms, the head excepted (a tied head keeps its own frozen copy).
  BaseFilter base_trains;
  std::optional<AdamW> optimizer;        // rebuilt, with fresh state, at every knot
  std::optional<MasterWeights> masters;  // of the trained base tensors not in fp32
  // Full fine-tuning on several ranks: optimizer and masters split over them (ZeRO-1); then
  // `optimizer` and `masters` exist only while a checkpoint or the final model is written.
  std::optional<ShardedAdamW> shards;
  std::optional<ExampleStream> stream;
  TrainerState state;
  std::ofstream metrics;
  LossHistory history;
  // The optimizer step in progress: its rows, their targets, the next micro-batch, the loss.
  std::vector<size_t> rows;
  int64_t targets = 0;
  int64_t next_micro = 0;
  StepLoss step_loss;
  int64_t step_tokens = 0;  // this rank's real tokens, in the step in progress
  int64_t step_slots = 0;   // and its rows' tokens with their padding
  int64_t tokens_since_log = 0, slots_since_log = 0;
  Clock::time_point started, log_started;
  int64_t first_step = 0;
  Status status = Status::Waiting;
  bool writes = true;  // rank 0 of a data-parallel run alone writes logs and outputs

  bool cola() const { return recipe.cola.enabled(); }
};

/// The jobs of a recipe with their resolved batch (gradient_accumulation_steps says it per
/// rank) and their outputs; nothing read yet.
std::vector<Job> make_jobs(const Recipe& recipe, int64_t world_size);

/// The job's data, read before any weight loads (its errors are the user's). The held-out
/// records are read as `lorafit eval --format F --max-seq-len L` reads them (one record a row,
/// no packing), so that eval_loss is the number that command prints.
void load_job_data(Job& job, const Tokenizer& tokenizer, const LlamaConfig& config);

/// What a user should hear about a job's schedule before it trains.
std::vector<std::string> schedule_warnings(const Job& job);

/// Finds what the job resumes from (--resume `resume`; with several jobs, `shared`, each its
/// own), and checks it, before anything loads: the checkpoint, its state, and that the recipe
/// is the one that checkpoint trained with (but for the keys that a resume may change).
void find_resume_point(Job& job, const std::string& resume, bool shared);

/// Attaches the job's fresh adapter (seeded by the job, as a run of it alone would be) and
/// decides which base tensors train with it.
void attach_job(Job& job, LlamaForCausalLM& model);

/// A fresh optimizer (and fp32 masters) over what the job trains.
void new_optimizer(Job& job, LlamaForCausalLM& model);

/// Overwrites the trained tensors with those saved in `dir` (same keys and shapes).
void copy_adapter_weights(Job& job, LlamaForCausalLM& model, const std::string& dir);

/// Puts the job where checkpoint `ckpt` left it: state, COLA chain, weights, optimizer, RNG.
void resume_job(Job& job, LlamaForCausalLM& model, const std::filesystem::path& ckpt);

/// A checkpoint of the job where it stands, exact enough to resume bit for bit.
void save_checkpoint(Job& job, LlamaForCausalLM& model, double rope_factor);

/// The job's final outputs, each folder written whole; job_state.json, the note that the job
/// finished (a resumed run skips it), comes last, so it never stands beside missing outputs.
void finish_job(Job& job, LlamaForCausalLM& model, double rope_factor);

/// The tensors whose gradients the job's step takes: the optimizer's, the model's own tensor in
/// place of an fp32 master (gradients reach the master only in take_grads).
std::vector<torch::Tensor> gradient_holders(const Job& job);

/// COLA's hook before an optimizer step: at a knot, the link is merged into the base and the
/// next starts with a fresh optimizer (logged). Nothing for a job without a chain.
void start_link_if_due(Job& job, LlamaForCausalLM& model, bool tty);

/// The learning rate of the job's next step: the schedule, warmed up again after a COLA knot
/// with cola.lr_restart: rewarm.
double job_lr(const Job& job);

}  // namespace lorafit
