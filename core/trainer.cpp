// A training run, top to bottom: set up each job (data, adapter, optimizer, maybe a checkpoint
// to resume) on one shared frozen model, then the step loop: the next micro-batch of every
// running job fused into one batch (grouped by length), one forward and one backward, and each
// job's optimizer step when its own accumulation completes, with logging, evaluation and
// checkpoints per job along the way. A recipe without `jobs:` is a run of one job.
#include "core/trainer.h"

#include <fmt/core.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <optional>

#include "adapters/job_routing.h"
#include "adapters/peft_names.h"
#include "core/adapter_io.h"
#include "core/checkpoint.h"
#include "core/cola.h"
#include "core/compat.h"
#include "core/datasets.h"
#include "core/device.h"
#include "core/distributed.h"
#include "core/errors.h"
#include "core/eval.h"
#include "core/loss_plot.h"
#include "core/merge.h"
#include "core/optimizer.h"
#include "core/run_dir.h"
#include "core/safetensors.h"
#include "core/stop_signal.h"

namespace lorafit {

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

// Rows of one job's examples in a batch.
struct BatchPart {
  const std::vector<Example>* examples;
  std::vector<size_t> rows;
};

// Right-pads the parts' rows, in order, to the longest, rounded up to a multiple of
// `pad_multiple` (S2-Attn's groups must split every batch's length).
Batch collate(const std::vector<BatchPart>& parts, torch::Device device, size_t pad_multiple = 1) {
  size_t t = 0;
  int64_t b = 0;
  for (const auto& part : parts) {
    for (auto r : part.rows) t = std::max(t, (*part.examples)[r].input_ids.size());
    b += static_cast<int64_t>(part.rows.size());
  }
  t = (t + pad_multiple - 1) / pad_multiple * pad_multiple;
  std::vector<int64_t> ids(b * t, 0), labels(b * t, kIgnoreLabel);
  std::vector<uint8_t> keep(b * t, 0);
  Batch out;
  int64_t i = 0;
  for (const auto& part : parts) {
    for (auto r : part.rows) {
      const auto& ex = (*part.examples)[r];
      std::copy(ex.input_ids.begin(), ex.input_ids.end(), ids.begin() + i * t);
      std::copy(ex.labels.begin(), ex.labels.end(), labels.begin() + i * t);
      std::fill_n(keep.begin() + i * t, ex.input_ids.size(), 1);
      out.tokens += static_cast<int64_t>(ex.input_ids.size());
      ++i;
    }
  }
  const auto ti = static_cast<int64_t>(t);
  // copy=true: on the CPU a plain .to() would keep viewing the local vectors. To a GPU through
  // pinned memory, without waiting: a pageable copy would wait for all the queued work.
  auto to_device = [&](void* data, torch::Dtype from, torch::Dtype to) {
    const auto host = torch::from_blob(data, {b, ti}, from);
    return device.is_cuda() ? host.pin_memory().to(device, to, /*non_blocking=*/true)
                            : host.to(device, to, false, true);
  };
  out.ids = to_device(ids.data(), torch::kInt64, torch::kInt64);
  out.labels = to_device(labels.data(), torch::kInt64, torch::kInt64);
  out.keep = to_device(keep.data(), torch::kUInt8, torch::kBool);
  return out;
}

// Targets that count in the loss: labels after the first position that are not ignored.
int64_t target_count(const std::vector<Example>& examples, const std::vector<size_t>& rows) {
  int64_t n = 0;
  for (auto r : rows) {
    const auto& l = examples[r].labels;
    n += std::count_if(l.begin() + 1, l.end(), [](int64_t x) { return x != kIgnoreLabel; });
  }
  return n;
}

// One forward pass over the batch; the summed negative log-likelihood of the targets of each
// run of `rows` consecutive rows (position t predicts label t+1).
std::vector<torch::Tensor> nll_sums(LlamaForCausalLM& model,
                                    const Batch& batch,
                                    const std::vector<int64_t>& rows) {
  const bool padded = batch.tokens < batch.ids.numel();
  auto hidden =
      model->forward(batch.ids, nullptr, padded ? batch.keep : torch::Tensor());  // [B, T, C]
  const auto t = hidden.size(1);
  std::vector<torch::Tensor> out;
  int64_t row = 0;
  for (const auto n : rows) {
    // The last position predicts nothing; ignored targets are skipped inside the loss.
    const auto labels = batch.labels.narrow(0, row, n);  // [n, T]
    const auto targets = torch::cat(
        {labels.narrow(1, 1, t - 1), torch::full({n, 1}, kIgnoreLabel, labels.options())}, 1);
    out.push_back(-target_log_prob_sum(model, hidden.narrow(0, row, n).reshape({n * t, -1}),
                                       targets.reshape({-1})));
    row += n;
  }
  return out;
}

torch::Tensor nll_sum(LlamaForCausalLM& model, const Batch& batch) {
  return nll_sums(model, batch, {batch.ids.size(0)})[0];
}

// A micro-batch's part of its step's loss, to back-propagate: its summed NLL over the step's
// `targets` (so the gradient is that of the mean over every target token of the step, not a
// mean of micro-batch means) plus the strategy's own term times `aux_scale` (keep: [N] bool,
// the real tokens, or undefined). Both parts are added, detached, to `step`.
torch::Tensor micro_batch_loss(const torch::Tensor& nll,
                               int64_t targets,
                               const AuxLoss& aux,
                               const torch::Tensor& keep,
                               double aux_scale,
                               StepLoss& step) {
  auto add = [](torch::Tensor& sum, const torch::Tensor& x) {
    sum = sum.defined() ? sum + x.detach() : x.detach();
  };
  auto loss = nll / static_cast<double>(std::max<int64_t>(1, targets));
  add(step.nll, loss);
  if (aux) {
    const auto share = aux(keep, aux_scale);
    if (share.defined()) {
      add(step.aux, share);
      loss = loss + share;
    }
  }
  return loss;
}

// The mean loss over `examples`, each rank taking every size-th of them.
double validation_loss(LlamaForCausalLM& model,
                       const std::vector<Example>& examples,
                       int64_t micro_batch,
                       torch::Device device,
                       World& world,
                       int64_t step) {
  torch::NoGradGuard no_grad;
  model->eval();
  std::vector<size_t> mine;
  for (size_t i = static_cast<size_t>(world.rank()); i < examples.size();
       i += static_cast<size_t>(world.size()))
    mine.push_back(i);
  auto nll = torch::zeros({}, torch::dtype(torch::kFloat64).device(device));
  for (size_t start = 0; start < mine.size(); start += micro_batch) {
    const std::vector<size_t> rows(mine.begin() + start,
                                   mine.begin() + std::min(mine.size(), start + micro_batch));
    nll += nll_sum(model, collate({{&examples, rows}}, device));
  }
  auto sums = torch::stack({nll, torch::full({}, static_cast<double>(target_count(examples, mine)),
                                             nll.options())});  // [2]
  world.sum({sums}, step);
  model->train();
  return sums[0].item<double>() / sums[1].item<double>();
}

std::string format_duration(double seconds) {
  const auto s = static_cast<int64_t>(seconds);
  return fmt::format("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60);
}

// Keeps the metrics lines of steps up to `step`: a resumed run rewrites what followed.
void truncate_metrics(const fs::path& path, int64_t step) {
  std::ifstream in(path);
  std::string kept, line;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_object() && j.value("step", int64_t{0}) <= step) kept += line + "\n";
  }
  write_file_atomic(path.string(), kept);
}

// One job of a run: its recipe, data, adapter and optimizer, and where it stands.
struct Job {
  enum class Status { Waiting, Running, Done, Failed, Stopped };

  Recipe recipe;       // the job's resolved recipe
  size_t index = 0;    // its slot in the routing
  std::string prefix;  // before its log lines: "[name] " when it shares the run
  fs::path out;
  const AdapterSpec* spec = nullptr;
  AdapterSettings settings;
  AdapterSites sites;  // where its adapters attach
  std::vector<Example> train_examples, valid_examples;
  size_t train_records = 0;
  fs::path checkpoint;         // to resume from; empty: from the start
  TrainerState resume_state;   // the checkpoint's
  int64_t finished_step = -1;  // where an earlier run of the job finished (job_state.json)
  int64_t saved_step = -1;     // of the job's newest checkpoint
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
  std::optional<ExampleStream> stream;
  TrainerState state;
  std::ofstream metrics;
  LossHistory history;
  // The optimizer step in progress: its rows, their targets, the next micro-batch, the loss.
  std::vector<size_t> rows;
  int64_t targets = 0;
  int64_t next_micro = 0;
  StepLoss step_loss;
  int64_t step_tokens = 0;  // this rank's, in the step in progress
  int64_t tokens_since_log = 0;
  Clock::time_point started, log_started;
  int64_t first_step = 0;
  Status status = Status::Waiting;
  bool writes = true;  // rank 0 of a data-parallel run alone writes logs and outputs

  bool cola() const { return recipe.cola.enabled(); }
};

void new_optimizer(Job& job, LlamaForCausalLM& model) {
  auto params = trainable_parameters(model, job.sites, job.base_trains);
  job.masters = masters_for(params);
  AdamWSettings adamw;
  adamw.weight_decay = job.recipe.train.weight_decay;
  job.optimizer.emplace(params, adamw);
}

// The tensors whose gradients the job's step takes: the optimizer's, the model's own tensor in
// place of an fp32 master (gradients reach the master only in take_grads).
std::vector<torch::Tensor> gradient_holders(const Job& job) {
  auto out = job.optimizer->params;
  if (job.masters)
    for (auto& t : out)
      for (size_t i = 0; i < job.masters->masters.size(); ++i)
        if (t.is_same(job.masters->masters[i])) t = job.masters->model[i];
  return out;
}

// The trained base tensors by checkpoint name, as checkpoints and outputs hold them: their
// fp32 masters where the model computes in a lower precision.
std::vector<std::pair<std::string, torch::Tensor>> trained_base(Job& job, LlamaForCausalLM& model) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (auto& [name, t] : model->checkpoint_tensors()) {
    if (!job.base_trains || !job.base_trains(name)) continue;
    out.emplace_back(name, t);
    if (!job.masters) continue;
    for (size_t i = 0; i < job.masters->model.size(); ++i)
      if (job.masters->model[i].is_same(t)) out.back().second = job.masters->masters[i];
  }
  return out;
}

// What a checkpoint or the job's output holds of the model: the adapter (with LongLoRA's
// trained embeddings and norms), or (full fine-tuning) the whole model as a Hugging Face
// checkpoint.
void save_adapter_to(Job& job,
                     LlamaForCausalLM& model,
                     double rope_factor,
                     const std::string& dir,
                     torch::Dtype full_dtype) {
  if (job.spec->trains_base) {
    fs::create_directories(dir);
    write_model_files(dir, trained_base(job, model), job.recipe.model, full_dtype);
  } else {
    auto saved = job.spec->save(job.settings, job.sites, job.recipe.model);
    add_modules_to_save(saved, trained_base(job, model));
    if (rope_factor > 1) saved.config["rope_scaling"] = linear_rope_scaling(rope_factor);
    write_adapter_files(dir, saved);
  }
  if (job.cola()) save_chain(dir, job.chain);
}

// Overwrites the trained tensors with those saved in `dir` (same keys and shapes).
void copy_adapter_weights(Job& job, LlamaForCausalLM& model, const std::string& dir) {
  torch::NoGradGuard no_grad;
  if (job.spec->trains_base) {
    SafetensorsCheckpoint saved(dir);
    for (auto& [name, t] : trained_base(job, model)) t.copy_(saved.tensor(name));
    if (job.masters) job.masters->publish();
    return;
  }
  SafetensorsFile saved((fs::path(dir) / "adapter_model.safetensors").string());
  auto trained = job.spec->save(job.settings, job.sites, job.recipe.model).tensors;
  for (auto& [name, t] : trained_base(job, model)) trained[kPeftPrefix + name] = t;
  for (const auto& [name, t] : trained) {
    if (!saved.find(name)) {
      throw ModelMismatchError("adapter '" + dir + "' has no tensor '" + name +
                               "' (hint: its targets and rank must match the recipe's adapter)");
    }
    const auto src = saved.tensor(name);
    if (src.sizes() != t.sizes()) {
      throw ModelMismatchError("adapter tensor '" + name + "' in '" + dir +
                               "' does not have the "
                               "recipe's shape (hint: adapter.r must match)");
    }
    t.copy_(src);
  }
  if (job.masters) job.masters->publish();
}

// The job's data, read before any weight loads (its errors are the user's). The held-out
// records are read as `lorafit eval --format F --max-seq-len L` reads them (one record a row,
// no packing), so that eval_loss is the number that command prints.
void load_job_data(Job& job, const Tokenizer& tokenizer, const LlamaConfig& config) {
  const auto& d = job.recipe.data;
  const auto& tr = job.recipe.train;
  const auto opts =
      dataset_options(tokenizer, config, d.format, d.max_seq_len, d.packing, d.chat_template);
  job.train_examples = load_examples(d.train, tokenizer, opts, &job.train_records);
  if (!d.valid.empty())
    job.valid_examples =
        eval_examples(d.valid, tokenizer, d.format, config, d.max_seq_len, d.chat_template);
  job.total_steps =
      tr.steps > 0
          ? tr.steps
          : (tr.epochs * static_cast<int64_t>(job.train_examples.size()) + tr.batch_size - 1) /
                tr.batch_size;
}

// Attaches the job's fresh adapter (seeded by the job, as a run of it alone would be).
void attach_job(Job& job, LlamaForCausalLM& model) {
  const auto& r = job.recipe;
  torch::manual_seed(static_cast<uint64_t>(r.seed));
  job.spec = &find_adapter(r.adapter.type);
  job.knots = job.cola() ? cola_knot_steps(r.cola, job.total_steps) : std::vector<int64_t>{};
  job.settings = cola_link_settings(r.cola, adapter_settings(r.adapter), 0);
  job.spec->attach_new(job.settings, job.sites);
  if (job.cola()) job.chain = start_chain(model);
  if (job.spec->aux_loss) {
    job.aux_loss = [&job](const torch::Tensor& keep, double scale) {
      return job.spec->aux_loss(job.settings, job.sites, keep, scale);
    };
  }
  if (job.spec->trains_base) job.base_trains = every_base_tensor;
  const auto& extra = r.longlora.trainable;
  const bool embed = std::count(extra.begin(), extra.end(), "embed") > 0;
  const bool norms = std::count(extra.begin(), extra.end(), "norm") > 0;
  if (r.longlora.enabled && (embed || norms)) {
    if (embed) model->untie_head();
    job.base_trains = [embed, norms](const std::string& name) {
      return (embed && name == "model.embed_tokens.weight") ||
             (norms && name.find("norm.weight") != std::string::npos);
    };
  }
}

// Finds what the job resumes from, and checks it, before anything loads: the checkpoint, its
// state, and that the recipe is the one that checkpoint trained with (but for the keys that a
// resume may change).
void find_resume_point(Job& job, const TrainRun& run, bool shared) {
  if (run.resume.empty()) return;
  // With several jobs, --resume names the run's output and each job resumes from its own: a
  // finished job is done, one without a checkpoint starts over.
  const auto from = shared ? job.out : fs::path(run.resume);
  job.checkpoint = find_checkpoint(from);
  if (job.checkpoint.empty() && !shared) {
    throw IoError("--resume '" + run.resume +
                  "': no checkpoint found (expected trainer_state.json there or "
                  "checkpoints/step-N/ under it)");
  }
  // Resuming a run (not one named checkpoint): a job that finished has nothing left to do.
  const auto state_file = job.out / "job_state.json";
  const bool named_checkpoint = !shared && fs::exists(from / "trainer_state.json");
  if (!named_checkpoint && fs::exists(state_file)) {
    const auto j = nlohmann::json::parse(std::ifstream(state_file), nullptr, false);
    if (j.is_object() && j.value("finished", false) && j.contains("step") &&
        j["step"].is_number_integer())
      job.finished_step = j["step"].get<int64_t>();
  }
  if (job.checkpoint.empty()) return;
  job.resume_state = read_trainer_state(job.checkpoint);
  job.saved_step = job.resume_state.step;
  const auto saved = checkpoint_recipe(job.checkpoint);
  if (!saved) return;
  const auto differences = resume_differences(*saved, job.recipe);
  if (!differences.empty()) {
    std::string changeable;
    for (const auto& k : resume_changeable_keys())
      changeable += (changeable.empty() ? "" : ", ") + k;
    throw ConfigError(job.prefix + "--resume '" + job.checkpoint.string() +
                      "': the recipe differs from the one that run trained with: " +
                      join_problems(differences, 20) +
                      " (hint: undo the change to resume, or train anew with another output "
                      "or --overwrite; a resume may change " +
                      changeable + ")");
  }
}

void resume_job(Job& job, LlamaForCausalLM& model, const fs::path& ckpt) {
  job.state = job.resume_state;
  if (job.cola()) {
    load_chain(ckpt.string(), job.chain, model);
    job.link = job.chain.links.size();
    job.settings =
        cola_link_settings(job.recipe.cola, adapter_settings(job.recipe.adapter), job.link);
    job.spec->attach_new(job.settings, job.sites);
    new_optimizer(job, model);
  }
  copy_adapter_weights(job, model, ckpt.string());
  job.optimizer->load((ckpt / "optimizer.safetensors").string());
  torch::Tensor rng;
  torch::load(rng, (ckpt / "rng.pt").string());
  compat::set_cpu_rng_state(rng);
  if (!job.writes) return;
  truncate_metrics(job.out / "metrics.jsonl", job.state.step);
  fmt::print(stderr, "{}resuming from {} (step {})\n", job.prefix, ckpt.string(), job.state.step);
}

// A checkpoint of the job where it stands, exact enough to resume bit for bit.
void save_checkpoint(Job& job, LlamaForCausalLM& model, double rope_factor) {
  write_checkpoint(
      job.out / "checkpoints" / ("step-" + std::to_string(job.state.step)), job.state,
      *job.optimizer, recipe_to_yaml(job.recipe),
      [&](const std::string& dir) {
        save_adapter_to(job, model, rope_factor, dir, torch::kFloat32);
      },
      job.recipe.train.save_total_limit);
  job.saved_step = job.state.step;
}

// The job's final outputs, each folder written whole; job_state.json, the note that the job
// finished (a resumed run skips it), comes last, so it never stands beside missing outputs.
void finish_job(Job& job, LlamaForCausalLM& model, double rope_factor) {
  job.status = Job::Status::Done;
  if (!job.writes) return;
  const auto& out = job.out;
  const auto write_state = [&] {
    write_file_atomic((out / "loss.svg").string(), loss_svg(job.history));
    write_file_atomic((out / "job_state.json").string(),
                      nlohmann::json{{"finished", true}, {"step", job.state.step}}.dump(2) + "\n");
  };
  if (job.spec->trains_base) {
    const fs::path dir = out / "model";
    write_folder_atomic(dir, [&](const std::string& tmp) {
      save_adapter_to(job, model, rope_factor, tmp, checkpoint_dtype(job.recipe.model));
    });
    write_state();
    fmt::print(stderr, "{}model written to {}\n", job.prefix, dir.string());
    fmt::print(stderr, "{}evaluate: lorafit eval --model {} --data FILE\n", job.prefix,
               dir.string());
    return;
  }
  const auto adapter = (out / "adapter").string();
  if (job.cola()) {
    // The chain as one PEFT LoRA, and every link (the last one still attached) on its own.
    write_folder_atomic(adapter, [&](const std::string& tmp) {
      write_adapter_files(tmp, chain_adapter(job.chain, model, job.settings, job.recipe.model));
    });
    job.chain.links.push_back(job.spec->save(job.settings, job.sites, job.recipe.model));
    save_chain(out.string(), job.chain);
    write_state();
    fmt::print(stderr, "chain of {} links written to {} (each link under {})\n",
               job.chain.links.size(), adapter, (out / "links").string());
  } else {
    write_folder_atomic(adapter, [&](const std::string& tmp) {
      save_adapter_to(job, model, rope_factor, tmp, torch::kFloat32);
    });
    write_state();
  }
  fmt::print(stderr, "{}adapter written to {}\n", job.prefix, adapter);
  fmt::print(stderr, "{}evaluate: lorafit eval --model {} --adapter {} --data FILE\n", job.prefix,
             job.recipe.model, adapter);
  fmt::print(stderr, "{}merge:    lorafit merge --model {} --adapter {} --out DIR\n", job.prefix,
             job.recipe.model, adapter);
}

// The micro-batches of a fused step, grouped so that few rows pad far beyond their length:
// longest first, a micro-batch joins the group while the group's length is at most twice its
// own. Each group is one forward pass (one base GEMM per projection for all its rows).
std::vector<std::vector<std::pair<Job*, std::vector<size_t>>>> group_by_length(
    std::vector<std::pair<Job*, std::vector<size_t>>> parts) {
  auto length = [](const std::pair<Job*, std::vector<size_t>>& p) {
    size_t t = 0;
    for (auto r : p.second) t = std::max(t, p.first->train_examples[r].input_ids.size());
    return t;
  };
  std::stable_sort(parts.begin(), parts.end(),
                   [&](const auto& a, const auto& b) { return length(a) > length(b); });
  std::vector<std::vector<std::pair<Job*, std::vector<size_t>>>> groups;
  size_t group_length = 0;
  for (auto& p : parts) {
    if (groups.empty() || length(p) * 2 < group_length) {
      groups.emplace_back();
      group_length = length(p);
    }
    groups.back().push_back(std::move(p));
  }
  return groups;
}

}  // namespace

StepLoss accumulate_gradients(LlamaForCausalLM& model,
                              const std::vector<Batch>& micro_batches,
                              int64_t targets,
                              const AuxLoss& aux) {
  StepLoss step;
  for (const auto& batch : micro_batches) {
    micro_batch_loss(nll_sum(model, batch), targets, aux,
                     batch.keep.defined() ? batch.keep.reshape({-1}) : batch.keep,
                     1.0 / static_cast<double>(micro_batches.size()), step)
        .backward();
  }
  return step;
}

void use_longlora_attention(LlamaForCausalLM& model, const LongLoraRecipe& l) {
  if (!l.enabled) return;
  model->use_s2(l.group_ratio, l.shift == "roll"     ? S2Shift::Roll
                               : l.shift == "nowrap" ? S2Shift::NoWrap
                                                     : S2Shift::None);
}

int64_t warmup_steps(const TrainRecipe& t, int64_t total) {
  if (t.warmup_ratio > 0)
    return static_cast<int64_t>(std::ceil(t.warmup_ratio * static_cast<double>(total)));
  return t.warmup_steps;
}

double scheduled_lr(const TrainRecipe& t, int64_t step, int64_t total) {
  const int64_t warmup = warmup_steps(t, total);
  if (step < warmup) return t.lr * static_cast<double>(step) / std::max<int64_t>(1, warmup);
  const double span = static_cast<double>(std::max<int64_t>(1, total - warmup));
  const double progress = static_cast<double>(step - warmup) / span;
  if (t.schedule == "linear") return t.lr * std::max(0.0, static_cast<double>(total - step) / span);
  if (t.schedule == "cosine") return t.lr * std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * progress)));
  return t.lr;
}

namespace {

// The jobs of a recipe with their resolved batch (gradient_accumulation_steps says it per
// rank) and their outputs; nothing read yet.
std::vector<Job> make_jobs(const Recipe& recipe, int64_t world_size) {
  const auto recipes = recipe_jobs(recipe);
  std::vector<Job> jobs(recipes.size());
  for (size_t j = 0; j < jobs.size(); ++j) {
    auto& job = jobs[j];
    job.recipe = recipes[j];
    job.index = j;
    job.out = job.recipe.output;
    if (recipes.size() > 1) job.prefix = "[" + job.recipe.name + "] ";
    auto& tr = job.recipe.train;
    if (tr.gradient_accumulation_steps > 0)
      tr.batch_size = tr.gradient_accumulation_steps * tr.micro_batch_size * world_size;
  }
  return jobs;
}

// What a user should hear about a job's schedule before it trains.
std::vector<std::string> schedule_warnings(const Job& job) {
  const auto& tr = job.recipe.train;
  const int64_t warmup = warmup_steps(tr, job.total_steps);
  std::vector<std::string> out;
  if (warmup >= job.total_steps) {
    out.push_back(fmt::format(
        "{}warning: the warmup ({} steps) is not shorter than the run ({} steps): the learning "
        "rate never reaches train.lr (hint: lower train.warmup_steps or set train.warmup_ratio)",
        job.prefix, warmup, job.total_steps));
  }
  return out;
}

}  // namespace

std::vector<std::string> describe_data(const Recipe& recipe, std::vector<std::string>& warnings) {
  const auto tokenizer = load_tokenizer(recipe.model);
  const auto config = load_llama_config(recipe.model);
  auto jobs = make_jobs(recipe, launch_from_env().world_size);
  std::vector<std::string> lines;
  for (auto& job : jobs) {
    load_job_data(job, tokenizer, config);
    const auto& d = job.recipe.data;
    const auto& tr = job.recipe.train;
    int64_t tokens = 0;
    for (const auto& ex : job.train_examples) tokens += static_cast<int64_t>(ex.input_ids.size());
    lines.push_back(fmt::format(
        "{}data.train '{}': {} records ({}), {} tokens in {} sequences of at most {} tokens{}",
        job.prefix, d.train, job.train_records, d.format, tokens, job.train_examples.size(),
        d.max_seq_len, d.format == "text" && d.packing ? " (packed)" : ""));
    if (!d.valid.empty()) {
      int64_t scored = 0;
      for (const auto& ex : job.valid_examples)
        scored += std::count_if(ex.labels.begin() + 1, ex.labels.end(),
                                [](int64_t l) { return l != kIgnoreLabel; });
      lines.push_back(fmt::format("{}data.valid '{}': {} records, {} tokens scored", job.prefix,
                                  d.valid, job.valid_examples.size(), scored));
    }
    lines.push_back(fmt::format("{}train: {} steps of {} sequences ({:.2f} epochs)", job.prefix,
                                job.total_steps, tr.batch_size,
                                static_cast<double>(job.total_steps * tr.batch_size) /
                                    static_cast<double>(job.train_examples.size())));
    for (auto& w : schedule_warnings(job)) warnings.push_back(std::move(w));
  }
  return lines;
}

void train(const Recipe& recipe, const TrainRun& run) {
  if (run.overwrite && !run.resume.empty()) {
    throw ConfigError(
        "--overwrite and --resume contradict each other (hint: --resume continues the run in "
        "its folder; --overwrite deletes it and trains anew)");
  }
  const auto mode = run.overwrite        ? OutputMode::Overwrite
                    : run.resume.empty() ? OutputMode::Fresh
                                         : OutputMode::Resume;
  const auto launch = launch_from_env();
  auto jobs = make_jobs(recipe, launch.world_size);
  const bool shared = jobs.size() > 1;

  // --- Set-up, in the order of what is cheap to check: the output folders and the
  // checkpoints to resume (nothing is written yet), every job's data, then the model.
  const bool top_output = shared && !recipe.output.empty();
  auto output_key = [](const Job& job) {
    return job.prefix.empty() ? std::string("'output'") : "job '" + job.recipe.name + "': output";
  };
  if (top_output) check_output(recipe.output, mode, "'output'");
  for (auto& job : jobs) {
    check_output(job.out.string(), mode, output_key(job));
    find_resume_point(job, run, shared);
  }
  const auto tokenizer = load_tokenizer(recipe.model);
  const auto config = load_llama_config(recipe.model);
  for (auto& job : jobs) load_job_data(job, tokenizer, config);
  // LongLoRA's position interpolation, checked before any weight loads: one for the shared base.
  double rope_factor = 0;
  for (const auto& job : jobs) {
    const double f = rope_scale_factor(job.recipe.longlora, job.recipe.data.max_seq_len,
                                       config.max_position_embeddings);
    if (rope_factor != 0 && f != rope_factor) {
      throw ConfigError("'longlora.rope_scale' auto gives the jobs different RoPE scales (" +
                        std::to_string(rope_factor) + " and " + std::to_string(f) +
                        ") for their data.max_seq_len, but they share one base (hint: set "
                        "longlora.rope_scale to a factor)");
    }
    rope_factor = f;
  }
  check_rope_interpolation(config.rope, rope_factor,
                           "'longlora.rope_scale' for model '" + recipe.model + "'");
  // Data parallelism: each rank takes its share of every job's global batch, one device each.
  for (const auto& job : jobs) {
    const auto& tr = job.recipe.train;
    if (tr.batch_size % (launch.world_size * tr.micro_batch_size) != 0) {
      throw ConfigError(fmt::format(
          "{}'train.batch_size' ({}) must be a multiple of WORLD_SIZE ({}) x "
          "'train.micro_batch_size' ({}): each rank takes an equal share of every batch",
          job.prefix, tr.batch_size, launch.world_size, tr.micro_batch_size));
    }
  }
  if (launch.rank == 0) {
    for (const auto& job : jobs)
      for (const auto& w : schedule_warnings(job)) fmt::print(stderr, "lorafit: {}\n", w);
  }
  auto device = pick_device(recipe.device);
  if (device.is_cuda() && launch.world_size > 1) {
    device = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(launch.local_rank));
    compat::use_cuda_device(device);
  }
  World world(launch, device, std::chrono::seconds(recipe.distributed.timeout_s),
              static_cast<int64_t>(recipe.distributed.bucket_mb * (1 << 20)));
  for (auto& job : jobs) {
    const auto& tr = job.recipe.train;
    job.writes = world.main();
    job.micro_batches = tr.batch_size / world.size() / tr.micro_batch_size;  // this rank's
  }
  torch::manual_seed(static_cast<uint64_t>(recipe.seed));
  auto model = load_llama(recipe.model, device, pick_dtype(recipe.dtype, device));
  model->interpolate_rope(rope_factor);
  auto routing = route_jobs(model->adapter_sites(), jobs.size());
  for (auto& job : jobs) {
    job.sites = routing.sites[job.index];
    attach_job(job, model);
  }
  routing.place_routers();
  model->checkpoint_layers = jobs.front().recipe.train.gradient_checkpointing;
  use_longlora_attention(model, recipe.longlora);
  // S2-Attn splits each batch into groups of group_ratio of its length, in halves.
  const size_t pad_multiple =
      recipe.longlora.enabled ? static_cast<size_t>(std::llround(2.0 / recipe.longlora.group_ratio))
                              : 1;
  for (auto& job : jobs) {
    new_optimizer(job, model);
    if (!job.recipe.adapter.init.empty()) copy_adapter_weights(job, model, job.recipe.adapter.init);
  }

  // Only now, with data and model loaded, does the run write anything (rank 0 alone): it
  // claims its folders for as long as it runs, then writes the recipes.
  std::vector<OutputLock> locks;
  if (world.main()) {
    if (top_output) {
      locks.emplace_back(recipe.output, mode, "'output'");
      write_file_atomic((fs::path(recipe.output) / "recipe.yaml").string(), recipe_to_yaml(recipe));
    }
    for (const auto& job : jobs) locks.emplace_back(job.out.string(), mode, output_key(job));
  }
  const bool tty = isatty(STDERR_FILENO) && !shared && world.main();
  auto evaluate_job = [&](Job& job) {
    routing.set_rows(JobRows::only(job.index).spans);
    const auto& tr = job.recipe.train;
    const double v = validation_loss(model, job.valid_examples, tr.micro_batch_size, device, world,
                                     job.state.step);
    if (!job.writes) return;
    job.metrics << nlohmann::json{{"step", job.state.step}, {"eval_loss", v}}.dump() << "\n"
                << std::flush;
    job.history.valid.emplace_back(job.state.step, v);
    fmt::print(stderr, "{}{}step {}/{}  eval_loss {:.4f}\n", tty ? "\r\033[K" : "", job.prefix,
               job.state.step, job.total_steps, v);
  };
  for (auto& job : jobs) {
    if (job.finished_step >= job.total_steps) {
      job.status = Job::Status::Done;
      if (job.writes)
        fmt::print(stderr, "{}finished earlier (step {}): outputs in {}\n", job.prefix,
                   job.finished_step, job.out.string());
      continue;
    }
    if (job.writes) {
      fs::create_directories(job.out / "checkpoints");
      write_file_atomic((job.out / "recipe.yaml").string(), recipe_to_yaml(job.recipe));
      // While it trains, the job is not finished, whatever an earlier run of it said.
      fs::remove(job.out / "job_state.json");
    }
    if (!job.checkpoint.empty()) resume_job(job, model, job.checkpoint);
    job.stream.emplace(job.train_examples.size(), static_cast<uint64_t>(job.recipe.seed),
                       job.state.data, job.recipe.data.shuffle);
    if (job.writes) {
      job.metrics.open(job.out / "metrics.jsonl", std::ios::app);
      job.history = read_loss_history((job.out / "metrics.jsonl").string());
    }
    job.first_step = job.state.step;
    if (job.state.step >= job.total_steps) {
      // Resumed at or past its end: nothing is left to train, only the outputs to write.
      if (job.writes)
        fmt::print(stderr,
                   "{}the checkpoint's step {} is at or past the run's {} steps: "
                   "nothing left to train\n",
                   job.prefix, job.state.step, job.total_steps);
      finish_job(job, model, rope_factor);
      continue;
    }
    // The held-out loss before any step, the first point of the loss curve.
    if (job.state.step == 0 && !job.valid_examples.empty() && job.recipe.train.eval_every > 0)
      evaluate_job(job);
  }
  const size_t max_running =
      recipe.max_concurrent > 0 ? static_cast<size_t>(recipe.max_concurrent) : jobs.size();
  std::vector<std::string> failures;
  bool stopping = false;  // SIGINT or SIGTERM reached a rank: no job starts, each stops
  const StopSignals stop_signals;
  model->train();

  // --- The step loop: one fused micro-batch of the running jobs per pass.
  while (true) {
    size_t running = 0;
    for (auto& job : jobs) {
      if (job.status == Job::Status::Waiting && running < max_running && !stopping) {
        job.status = Job::Status::Running;
        job.started = job.log_started = Clock::now();
        if (shared && job.writes)
          fmt::print(stderr, "{}starts ({} steps)\n", job.prefix, job.total_steps);
      }
      running += job.status == Job::Status::Running;
    }
    if (running == 0) break;
    // Each running job's next micro-batch; a job starting an optimizer step draws its rows.
    std::vector<std::pair<Job*, std::vector<size_t>>> parts;
    for (auto& job : jobs) {
      if (job.status != Job::Status::Running) continue;
      const auto& tr = job.recipe.train;
      if (job.next_micro == 0) {
        if (job.link < job.knots.size() && job.state.step == job.knots[job.link]) {
          // COLA: merge the link into the base, start the next with a fresh optimizer.
          const auto next =
              cola_link_settings(job.recipe.cola, adapter_settings(job.recipe.adapter), ++job.link);
          tie_knot(job.chain, model, *job.spec, job.settings, next, job.recipe.model);
          job.settings = next;
          new_optimizer(job, model);
          if (job.writes) {
            job.metrics << nlohmann::json{{"step", job.state.step},
                                          {"knot", job.link},
                                          {"r", job.settings.r}}
                               .dump()
                        << "\n";
            fmt::print(stderr, "{}{}step {}/{}  knot {}: link {} merged, link {} (r={}) starts\n",
                       tty ? "\r\033[K" : "", job.prefix, job.state.step, job.total_steps, job.link,
                       job.link, job.link + 1, job.settings.r);
          }
        }
        job.rows = job.stream->next(tr.batch_size);
        job.targets = target_count(job.train_examples, job.rows);
        job.step_loss = {};
      }
      // This rank's share of the global batch, then its next micro-batch.
      const auto first = job.rows.begin() + world.rank() * (tr.batch_size / world.size()) +
                         job.next_micro * tr.micro_batch_size;
      parts.emplace_back(&job, std::vector<size_t>(first, first + tr.micro_batch_size));
      for (auto r : parts.back().second)
        job.step_tokens += static_cast<int64_t>(job.train_examples[r].input_ids.size());
    }

    for (const auto& group : group_by_length(parts)) {
      std::vector<BatchPart> batch_parts;
      std::vector<JobRows::Span> spans;
      std::vector<int64_t> row_counts;
      for (const auto& [job, rows] : group) {
        batch_parts.push_back({&job->train_examples, rows});
        spans.push_back({job->index, static_cast<int64_t>(rows.size())});
        row_counts.push_back(static_cast<int64_t>(rows.size()));
      }
      const auto batch = collate(batch_parts, device, pad_multiple);
      routing.set_rows(spans);
      const auto nll = nll_sums(model, batch, row_counts);
      // Each job's micro-batch adds its part of the job's step loss (the strategy's term
      // averaged over the micro-batches of the global batch, all ranks together); one
      // backward for the group.
      const bool padded = batch.tokens < batch.ids.numel();
      torch::Tensor total;
      int64_t row = 0;
      for (size_t i = 0; i < group.size(); ++i) {
        auto& job = *group[i].first;
        const auto n = row_counts[i];
        const auto& tr = job.recipe.train;
        const auto loss = micro_batch_loss(
            nll[i], job.targets, job.aux_loss,
            padded ? batch.keep.narrow(0, row, n).reshape({-1}) : torch::Tensor(),
            static_cast<double>(tr.micro_batch_size) / static_cast<double>(tr.batch_size),
            job.step_loss);
        total = total.defined() ? total + loss : loss;
        row += n;
      }
      total.backward();
    }

    // Each job whose accumulation is complete takes its optimizer step.
    for (auto& [job_ptr, rows] : parts) {
      auto& job = *job_ptr;
      const auto& tr = job.recipe.train;
      if (++job.next_micro < job.micro_batches) continue;
      job.next_micro = 0;
      // Data parallelism: the ranks' gradients (each already a share of the global token
      // mean) and losses are summed, so every rank takes the same step; so is the count of
      // ranks that were asked to stop, so that all stop after the same step.
      const auto f64 = job.step_loss.nll.options().dtype(torch::kFloat64);
      auto stats = torch::stack(  // [4]: nll, aux, tokens of the step, stop requests
          {job.step_loss.nll.to(torch::kFloat64),
           job.step_loss.aux.defined() ? job.step_loss.aux.to(torch::kFloat64)
                                       : torch::zeros({}, f64),
           torch::full({}, static_cast<double>(job.step_tokens), f64),
           torch::full({}, StopSignals::received() != 0 ? 1.0 : 0.0, f64)});
      if (world.size() > 1) {
        std::vector<torch::Tensor> reduced{stats};
        for (auto& t : gradient_holders(job)) {
          if (!t.grad().defined()) t.mutable_grad() = torch::zeros_like(t);
          reduced.push_back(t.grad());
        }
        world.sum(reduced, job.state.step + 1);
      }
      // Reading the loss waits for the backward pass, once per step: a non-finite loss must
      // stop the job before the update.
      const auto host = stats.cpu();
      const double loss_sum = host[0].item<double>();
      const double aux_sum = host[1].item<double>();
      job.tokens_since_log += static_cast<int64_t>(host[2].item<double>());
      job.step_tokens = 0;
      stopping = stopping || host[3].item<double>() > 0;
      if (!std::isfinite(loss_sum + aux_sum)) {
        const auto last = find_checkpoint(job.out);
        const auto failure = fmt::format(
            "{}the training loss became {} at step {}; {} (hint: lower train.lr or raise "
            "train.warmup_steps)",
            shared ? "job '" + job.recipe.name + "': " : "", loss_sum, job.state.step + 1,
            last.empty() ? "no checkpoint was written before it"
                         : "the last good checkpoint is " + last.string());
        job.status = Job::Status::Failed;
        failures.push_back(failure);
        if (shared && job.writes)
          fmt::print(stderr, "lorafit: {}; the other jobs go on\n", failure);
        continue;
      }
      double lr = scheduled_lr(tr, job.state.step, job.total_steps);
      const int64_t warmup = warmup_steps(tr, job.total_steps);
      if (job.recipe.cola.lr_restart == "rewarm" && job.link > 0 && warmup > 0) {
        lr *= std::min(1.0, static_cast<double>(job.state.step - job.knots[job.link - 1]) /
                                static_cast<double>(warmup));
      }
      if (job.masters) job.masters->take_grads();
      const auto grad_norm = job.optimizer->step(lr, tr.max_grad_norm);  // [] or undefined
      if (job.masters) job.masters->publish();
      ++job.state.step;
      job.state.data = job.stream->position();

      const bool log_step = job.state.step % tr.log_every == 0 || job.state.step == job.total_steps;
      if (job.writes && (log_step || tty)) {
        const double secs = std::chrono::duration<double>(Clock::now() - job.log_started).count();
        const double tok_s = job.tokens_since_log / std::max(secs, 1e-9);
        const double done = std::chrono::duration<double>(Clock::now() - job.started).count();
        const double eta =
            done / (job.state.step - job.first_step) * (job.total_steps - job.state.step);
        // A terminal gets one line updated every step; a pipe gets a line per log step.
        fmt::print(stderr, "{}{}step {}/{}  loss {:.4f}  lr {:.3e}  {:.0f} tok/s  ETA {}{}",
                   tty ? "\r\033[K" : "", job.prefix, job.state.step, job.total_steps, loss_sum, lr,
                   tok_s, format_duration(eta), tty ? "" : "\n");
        if (log_step) {
          nlohmann::json line{{"step", job.state.step},
                              {"loss", loss_sum},
                              {"lr", lr},
                              {"grad_norm", grad_norm.defined() ? grad_norm.item<double>() : 0.0},
                              {"tokens_per_s", tok_s}};
          if (job.step_loss.aux.defined()) line["aux_loss"] = aux_sum;
          if (job.spec->step_metrics) line.update(job.spec->step_metrics(job.settings, job.sites));
          job.metrics << line.dump() << "\n" << std::flush;
          job.history.train.emplace_back(job.state.step, loss_sum);
          job.tokens_since_log = 0;
          job.log_started = Clock::now();
        }
      }
      const bool last_step = job.state.step == job.total_steps;
      if (!job.valid_examples.empty() && tr.eval_every > 0 &&
          (job.state.step % tr.eval_every == 0 || last_step))
        evaluate_job(job);
      if (job.writes && tr.save_every > 0 && (job.state.step % tr.save_every == 0 || last_step))
        save_checkpoint(job, model, rope_factor);
      if (last_step) {
        if (tty) fmt::print(stderr, "\n");
        finish_job(job, model, rope_factor);
      } else if (stopping) {
        if (job.writes && job.saved_step != job.state.step)
          save_checkpoint(job, model, rope_factor);
        job.status = Job::Status::Stopped;
      }
    }
  }
  if (stopping) {
    std::string where;
    for (const auto& job : jobs) {
      if (job.status != Job::Status::Stopped) continue;
      where += fmt::format(
          "{}{}step {} is saved in {}", where.empty() ? "" : "; ", job.prefix, job.state.step,
          (job.out / "checkpoints" / ("step-" + std::to_string(job.state.step))).string());
    }
    if (tty) fmt::print(stderr, "\n");
    const int sig = StopSignals::received() != 0 ? StopSignals::received() : SIGTERM;
    const auto output = top_output ? recipe.output : jobs.front().out.string();
    throw Interrupted(fmt::format("stopped by {}{}; continue with: lorafit train {} --resume {}",
                                  sig == SIGINT ? "SIGINT" : "SIGTERM",
                                  where.empty() ? "" : ": " + where, run.recipe_path, output),
                      sig);
  }
  if (!failures.empty()) throw Error(join_problems(failures, /*limit=*/100));
}

}  // namespace lorafit
