// A training run, top to bottom: set up each job (data, adapter, optimizer, maybe a checkpoint
// to resume; core/job.h) on one shared frozen model, then the step loop: the next micro-batch
// of every running job fused into one batch (grouped by length), one forward and one backward,
// and each job's all-reduce, clipping and optimizer step when its own accumulation completes,
// with logging, evaluation and checkpoints per job along the way. A recipe without `jobs:` is
// a run of one job.
#include "core/trainer.h"

#include <fmt/core.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <optional>

#include "adapters/job_routing.h"
#include "core/batching.h"
#include "core/checkpoint.h"
#include "core/compat.h"
#include "core/datasets.h"
#include "core/device.h"
#include "core/distributed.h"
#include "core/errors.h"
#include "core/job.h"
#include "core/loss.h"
#include "core/optimizer.h"
#include "core/run_dir.h"
#include "core/safetensors.h"
#include "core/step_graphs.h"
#include "core/stop_signal.h"

namespace lorafit {

namespace {

namespace fs = std::filesystem;

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

// Starts waiting jobs while fewer than `max_running` run (none once stopping); the number
// running.
size_t start_waiting_jobs(std::vector<Job>& jobs, size_t max_running, bool stopping, bool shared) {
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
  return running;
}

// Each running job's next micro-batch of this rank's share of its global batch; a job starting
// an optimizer step first passes its strategy hook (a COLA knot) and draws the step's rows.
std::vector<BatchPart> next_micro_batches(std::vector<Job>& jobs,
                                          LlamaForCausalLM& model,
                                          const World& world,
                                          bool tty) {
  std::vector<BatchPart> parts;
  for (auto& job : jobs) {
    if (job.status != Job::Status::Running) continue;
    const auto& tr = job.recipe.train;
    if (job.next_micro == 0) {
      start_link_if_due(job, model, tty);
      job.rows = job.stream->next(tr.batch_size);
      job.targets = target_count(job.train_examples, job.rows);
      job.step_loss = {};
    }
    const auto first = job.rows.begin() + world.rank() * (tr.batch_size / world.size()) +
                       job.next_micro * tr.micro_batch_size;
    parts.push_back({&job.train_examples, {first, first + tr.micro_batch_size}, job.index});
    for (auto r : parts.back().rows)
      job.step_tokens += static_cast<int64_t>(job.train_examples[r].input_ids.size());
  }
  return parts;
}

// Which job owns which rows of a group's batch, in row order.
std::vector<JobRows::Span> spans_of(const std::vector<BatchPart>& group) {
  std::vector<JobRows::Span> spans;
  for (const auto& part : group)
    spans.push_back({part.job, static_cast<int64_t>(part.rows.size())});
  return spans;
}

// Each part's share of its job's step loss: over the step's targets, the strategy's term
// averaged over the micro-batches of the global batch (all ranks together).
std::vector<StepPart> loss_parts(std::vector<Job>& jobs, const std::vector<BatchPart>& group) {
  std::vector<StepPart> out;
  for (const auto& part : group) {
    auto& job = jobs[part.job];
    const auto& tr = job.recipe.train;
    out.push_back({static_cast<int64_t>(part.rows.size()), job.targets, &job.aux_loss,
                   static_cast<double>(tr.micro_batch_size) / static_cast<double>(tr.batch_size),
                   &job.step_loss});
  }
  return out;
}

// A job's step as every rank agrees on it.
struct StepStats {
  double loss = 0, aux = 0;
  int64_t tokens = 0;  // of the step, all ranks
  int64_t slots = 0;   // the rows' tokens with their padding, all ranks
  bool stop = false;   // some rank was asked to stop
  // Data parallelism: how the gradients' all-reduce overlapped the backward.
  std::optional<OverlappedGradients::Overlap> overlap;
};

// Data parallelism: the ranks' losses are summed (their gradients, each already a share of
// the global token mean, were summed during the backward), and so is the count of ranks that
// were asked to stop, so that all stop after the same step. Reading the result waits for the
// backward pass, once per step: a non-finite loss must stop the job before the update.
StepStats all_reduce_step(Job& job, World& world) {
  const auto f64 = job.step_loss.nll.options().dtype(torch::kFloat64);
  auto stats = torch::stack(  // [5]: nll, aux, tokens and slots of the step, stop requests
      {job.step_loss.nll.to(torch::kFloat64),
       job.step_loss.aux.defined() ? job.step_loss.aux.to(torch::kFloat64) : torch::zeros({}, f64),
       torch::full({}, static_cast<double>(job.step_tokens), f64),
       torch::full({}, static_cast<double>(job.step_slots), f64),
       torch::full({}, StopSignals::received() != 0 ? 1.0 : 0.0, f64)});
  world.sum({stats}, job.state.step + 1);
  const auto host = stats.cpu();
  job.step_tokens = job.step_slots = 0;
  return {host[0].item<double>(),
          host[1].item<double>(),
          static_cast<int64_t>(host[2].item<double>()),
          static_cast<int64_t>(host[3].item<double>()),
          host[4].item<double>() > 0,
          std::nullopt};
}

// Full fine-tuning on several ranks: each keeps a 1/N share of the fp32 masters and moments.
void shard_state(Job& job, World& world) {
  int64_t whole = 0;  // bytes one process holds: both moments, and masters where not fp32
  for (const auto& t : job.optimizer->params) whole += 8 * t.numel();
  if (job.masters)
    for (const auto& t : job.masters->masters) whole += 4 * t.numel();
  job.shards.emplace(world, gradient_holders(job), *job.optimizer);
  job.optimizer.reset();
  job.masters.reset();
  if (job.writes) {
    fmt::print(stderr,
               "{}optimizer state split over {} ranks: {:.4g} MiB a rank (one process: {:.4g} "
               "MiB)\n",
               job.prefix, world.size(), 12.0 * static_cast<double>(job.shards->shard) / (1 << 20),
               static_cast<double>(whole) / (1 << 20));
  }
}

// Runs `write` with the job's whole optimizer state and masters in place: gathered from the
// ranks (every rank calls this) when they are sharded, and dropped again after.
template <typename F>
void with_full_state(Job& job, F&& write) {
  if (job.shards) job.shards->gather(job.optimizer, job.masters);
  write();
  if (job.shards) {
    job.optimizer.reset();
    job.masters.reset();
  }
}

// Marks the job failed after a non-finite loss; the message, naming its last good checkpoint.
std::string fail_job(Job& job, double loss, bool shared) {
  const auto last = find_checkpoint(job.out);
  const auto failure = fmt::format(
      "{}the training loss became {} at step {}; {} (hint: lower train.lr or raise "
      "train.warmup_steps)",
      shared ? "job '" + job.recipe.name + "': " : "", loss, job.state.step + 1,
      last.empty() ? "no checkpoint was written before it"
                   : "the last good checkpoint is " + last.string());
  job.status = Job::Status::Failed;
  if (shared && job.writes) fmt::print(stderr, "lorafit: {}; the other jobs go on\n", failure);
  return failure;
}

// The step's line: a terminal gets one line updated every step, a pipe a line per log step,
// and metrics.jsonl a record per log step (with the strategy's own fields).
void log_step(
    Job& job, const StepStats& stats, double lr, const torch::Tensor& grad_norm, bool tty) {
  const auto& tr = job.recipe.train;
  job.tokens_since_log += stats.tokens;
  job.slots_since_log += stats.slots;
  const bool log = job.state.step % tr.log_every == 0 || job.state.step == job.total_steps;
  if (!job.writes || !(log || tty)) return;
  const double secs = std::chrono::duration<double>(Clock::now() - job.log_started).count();
  const double tok_s = job.tokens_since_log / std::max(secs, 1e-9);
  const double done = std::chrono::duration<double>(Clock::now() - job.started).count();
  const double eta = done / (job.state.step - job.first_step) * (job.total_steps - job.state.step);
  fmt::print(stderr, "{}{}step {}/{}  loss {:.4f}  lr {:.3e}  {:.0f} tok/s  ETA {}{}",
             tty ? "\r\033[K" : "", job.prefix, job.state.step, job.total_steps, stats.loss, lr,
             tok_s, format_duration(eta), tty ? "" : "\n");
  if (!log) return;
  nlohmann::json line{
      {"step", job.state.step},
      {"loss", stats.loss},
      {"lr", lr},
      {"grad_norm", grad_norm.defined() ? grad_norm.item<double>() : 0.0},
      {"tokens_per_s", tok_s},
      {"padding", 1.0 - static_cast<double>(job.tokens_since_log) /
                            static_cast<double>(std::max<int64_t>(1, job.slots_since_log))}};
  if (job.step_loss.aux.defined()) line["aux_loss"] = stats.aux;
  if (job.spec->step_metrics) line.update(job.spec->step_metrics(job.settings, job.sites));
  if (stats.overlap) {
    line["allreduce"] = {{"buckets", stats.overlap->buckets},
                         {"started_in_backward", stats.overlap->started_in_backward},
                         {"grads_after_first_start", stats.overlap->grads_after_first_start}};
  }
  job.metrics << line.dump() << "\n" << std::flush;
  job.history.train.emplace_back(job.state.step, stats.loss);
  job.tokens_since_log = job.slots_since_log = 0;
  job.log_started = Clock::now();
}

}  // namespace

void forward_backward(LlamaForCausalLM& model,
                      const Batch& batch,
                      const std::vector<StepPart>& parts) {
  std::vector<int64_t> rows;
  for (const auto& p : parts) rows.push_back(p.rows);
  const auto nll = nll_sums(model, batch, rows);
  const bool padded = batch.tokens < batch.ids.numel();
  torch::Tensor total;
  int64_t row = 0;
  for (size_t i = 0; i < parts.size(); ++i) {
    const auto& p = parts[i];
    const auto keep = padded ? batch.keep.narrow(0, row, p.rows).reshape({-1}) : torch::Tensor();
    const auto loss =
        micro_batch_loss(nll[i], p.targets, p.aux ? *p.aux : AuxLoss(), keep, p.aux_scale, *p.loss);
    total = total.defined() ? total + loss : loss;
    row += p.rows;
  }
  total.backward();
}

torch::Tensor apply_update(AdamW& optimizer,
                           std::optional<MasterWeights>& masters,
                           double lr,
                           double max_grad_norm) {
  if (masters) masters->take_grads();
  auto grad_norm = optimizer.step(lr, max_grad_norm);
  if (masters) masters->publish();
  return grad_norm;
}

StepLoss accumulate_gradients(LlamaForCausalLM& model,
                              const std::vector<Batch>& micro_batches,
                              int64_t targets,
                              const AuxLoss& aux) {
  StepLoss step;
  const double scale = 1.0 / static_cast<double>(micro_batches.size());
  for (const auto& batch : micro_batches)
    forward_backward(model, batch, {{batch.ids.size(0), targets, &aux, scale, &step}});
  return step;
}

size_t batch_length_multiple(const LongLoraRecipe& l) {
  // S2-Attn splits each batch into groups of group_ratio of its length, in halves.
  return l.enabled ? static_cast<size_t>(std::llround(2.0 / l.group_ratio)) : 1;
}

void use_recipe_layers(LlamaForCausalLM& model, const Recipe& recipe) {
  const auto& t = recipe.train;
  CheckpointKeep keep;
  for (const auto& text : t.checkpoint_keep) {
    const auto item = checkpoint_keep_item(text).value();  // the recipe checked it
    const auto layers = item.layers > 0 ? item.layers : CheckpointKeep::kEveryLayer;
    if (item.what == "attention") keep.attention = true, keep.attention_layers = layers;
    if (item.what == "residual") keep.residual = true, keep.residual_layers = layers;
    if (item.what == "gate_up") keep.gate_up = true, keep.gate_up_layers = layers;
  }
  model->checkpoint_layers = t.gradient_checkpointing;
  model->checkpoint_keep = keep;
  const auto& l = recipe.longlora;
  if (!l.enabled) return;
  model->use_s2(l.group_ratio, l.shift == "roll"     ? S2Shift::Roll
                               : l.shift == "nowrap" ? S2Shift::NoWrap
                                                     : S2Shift::None);
}

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
        d.max_seq_len,
        d.packing == "concat" ? " (concatenated)"
        : d.packing == "true" ? " (records packed)"
                              : ""));
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
    find_resume_point(job, run.resume, shared);
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
  OverlappedGradients overlap(world);
  if (recipe.train.cuda_graphs) StepGraphs::check(device, world.size());
  for (auto& job : jobs) {
    const auto& tr = job.recipe.train;
    job.writes = world.main();
    job.micro_batches = tr.batch_size / world.size() / tr.micro_batch_size;  // this rank's
  }
  torch::manual_seed(static_cast<uint64_t>(recipe.seed));
  auto model = load_llama(recipe.model, device, pick_dtype(recipe.dtype, device),
                          parse_quantize(recipe.quantize, "quantize"));
  model->interpolate_rope(rope_factor);
  auto routing = route_jobs(model->adapter_sites(), jobs.size());
  for (auto& job : jobs) {
    job.sites = routing.sites[job.index];
    attach_job(job, model);
  }
  routing.place_routers();
  use_recipe_layers(model, recipe);
  const size_t pad_multiple = batch_length_multiple(recipe.longlora);
  for (auto& job : jobs) {
    new_optimizer(job, model);
    if (!job.recipe.adapter.init.empty()) copy_adapter_weights(job, model, job.recipe.adapter.init);
  }
  std::optional<StepGraphs> graphs;
  if (recipe.train.cuda_graphs) {
    std::vector<torch::Tensor> trainable;
    for (const auto& job : jobs)
      for (auto& t : gradient_holders(job)) trainable.push_back(t);
    graphs.emplace(device, std::move(trainable));
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
    if (world.size() > 1 && job.spec->trains_base) shard_state(job, world);
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
    if (start_waiting_jobs(jobs, max_running, stopping, shared) == 0) break;
    // ---------------------------------------------------------------------------------------
    // One training step (of each job whose accumulation completes in this pass).
    const auto parts = next_micro_batches(jobs, model, world, tty);
    // The jobs whose step ends in this pass sum their gradients over the ranks as the
    // backward finishes them.
    std::vector<std::vector<torch::Tensor>> finishing;
    int64_t finishing_step = 0;
    for (const auto& part : parts) {
      const auto& job = jobs[part.job];
      if (job.next_micro + 1 < job.micro_batches) continue;
      finishing.push_back(gradient_holders(job));
      finishing_step = std::max(finishing_step, job.state.step + 1);
    }
    overlap.arm(finishing, finishing_step);
    for (const auto& group : group_by_length(parts)) {
      const auto batch = collate(group, device, pad_multiple);
      const auto spans = spans_of(group);
      routing.set_rows(spans);
      for (const auto& part : group)
        jobs[part.job].step_slots += static_cast<int64_t>(part.rows.size()) * batch.ids.size(1);
      // Forward, loss, backward: replayed from a CUDA graph where this layout was captured.
      if (graphs) {
        graphs->forward_backward(model, batch, spans, loss_parts(jobs, group));
      } else {
        forward_backward(model, batch, loss_parts(jobs, group));
      }
    }
    overlap.finish();
    for (const auto& part : parts) {
      auto& job = jobs[part.job];
      const auto& tr = job.recipe.train;
      if (++job.next_micro < job.micro_batches) continue;
      job.next_micro = 0;
      auto stats = all_reduce_step(job, world);  // losses, stop requests
      if (world.size() > 1) stats.overlap = overlap.last();
      stopping = stopping || stats.stop;
      if (!std::isfinite(stats.loss + stats.aux)) {
        failures.push_back(fail_job(job, stats.loss, shared));
        continue;
      }
      const double lr = job_lr(job);
      const auto grad_norm = job.shards
                                 ? job.shards->step(lr, tr.max_grad_norm, job.state.step + 1)
                                 : apply_update(*job.optimizer, job.masters, lr, tr.max_grad_norm);
      ++job.state.step;
      job.state.data = job.stream->position();
      // -------------------------------------------------------------------------------------
      log_step(job, stats, lr, grad_norm, tty);
      const bool last_step = job.state.step == job.total_steps;
      if (!job.valid_examples.empty() && tr.eval_every > 0 &&
          (job.state.step % tr.eval_every == 0 || last_step))
        evaluate_job(job);
      // Every rank decides alike: sharded state is gathered by all of them.
      auto checkpoint = [&] {
        with_full_state(job, [&] {
          if (job.writes) save_checkpoint(job, model, rope_factor);
        });
        job.saved_step = job.state.step;
      };
      if (tr.save_every > 0 && (job.state.step % tr.save_every == 0 || last_step)) checkpoint();
      if (last_step) {
        if (tty) fmt::print(stderr, "\n");
        with_full_state(job, [&] { finish_job(job, model, rope_factor); });
      } else if (stopping) {
        if (job.saved_step != job.state.step) checkpoint();
        job.status = Job::Status::Stopped;
      }
    }
  }
  if (graphs && world.main()) {
    fmt::print(stderr,
               "lorafit: cuda_graphs replayed {} of {} forward-backward passes ({} graphs)\n",
               graphs->replayed(), graphs->passes(), graphs->captured());
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
