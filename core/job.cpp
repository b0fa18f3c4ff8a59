#include "core/job.h"

#include <fmt/core.h>

#include <algorithm>
#include <fstream>

#include "adapters/peft_names.h"
#include "adapters/registry.h"
#include "core/compat.h"
#include "core/errors.h"
#include "core/eval.h"
#include "core/merge.h"
#include "core/run_dir.h"
#include "core/safetensors.h"

namespace lorafit {

namespace fs = std::filesystem;

namespace {

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
// checkpoint. Returns the strategy's notes for the user.
std::vector<std::string> save_adapter_to(Job& job,
                                         LlamaForCausalLM& model,
                                         double rope_factor,
                                         const std::string& dir,
                                         torch::Dtype full_dtype) {
  std::vector<std::string> notes;
  if (job.spec->trains_base) {
    fs::create_directories(dir);
    write_model_files(dir, trained_base(job, model), job.recipe.model, full_dtype);
  } else {
    auto saved = job.spec->save(job.settings, job.sites, job.recipe.model);
    add_modules_to_save(saved, trained_base(job, model));
    if (rope_factor > 1) saved.config["rope_scaling"] = linear_rope_scaling(rope_factor);
    write_adapter_files(dir, saved);
    notes = saved.notes;
  }
  if (job.cola()) save_chain(dir, job.chain);
  return notes;
}

}  // namespace

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

void new_optimizer(Job& job, LlamaForCausalLM& model) {
  auto params = trainable_parameters(model, job.sites, job.base_trains);
  job.masters = masters_for(params);
  AdamWSettings adamw;
  adamw.weight_decay = job.recipe.train.weight_decay;
  job.optimizer.emplace(params, adamw);
}

std::vector<torch::Tensor> gradient_holders(const Job& job) {
  if (job.shards) return job.shards->model;
  return gradient_tensors(*job.optimizer, job.masters);
}

void copy_adapter_weights(Job& job, LlamaForCausalLM& model, const std::string& dir) {
  torch::NoGradGuard no_grad;
  const std::string what = "'" + dir + "' does not hold what the recipe trains";
  const std::string hint = "its type, targets and rank must match the recipe's adapter";
  if (job.spec->trains_base) {
    SafetensorsCheckpoint saved(dir);
    TensorBinding binding(saved);
    const auto trained = trained_base(job, model);
    for (const auto& [name, t] : trained) binding.expect(name, t.sizes());
    binding.check(what, hint);
    for (auto& [name, t] : trained) t.copy_(saved.tensor(name));
    if (job.masters) job.masters->publish();
    return;
  }
  const auto saved = read_adapter_files(dir).tensors;
  TensorBinding binding(saved);
  auto trained = job.spec->save(job.settings, job.sites, job.recipe.model).tensors;
  for (auto& [name, t] : trained_base(job, model)) trained[kPeftPrefix + name] = t;
  for (const auto& [name, t] : trained) binding.expect(name, t.sizes());
  binding.report_unexpected("is not one that the recipe's adapter trains");
  binding.check(what, hint);
  for (auto& [name, t] : trained) t.copy_(saved.at(name));
  if (job.masters) job.masters->publish();
}

void load_job_data(Job& job, const Tokenizer& tokenizer, const LlamaConfig& config) {
  const auto& d = job.recipe.data;
  const auto& tr = job.recipe.train;
  const auto opts = dataset_options(tokenizer, config, d.format, d.max_seq_len,
                                    parse_packing(d.packing), d.chat_template);
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

void find_resume_point(Job& job, const std::string& resume, bool shared) {
  if (resume.empty()) return;
  // With several jobs, --resume names the run's output and each job resumes from its own: a
  // finished job is done, one without a checkpoint starts over.
  const auto from = shared ? job.out : fs::path(resume);
  job.checkpoint = find_checkpoint(from);
  if (job.checkpoint.empty() && !shared) {
    throw IoError("--resume '" + resume +
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
  std::vector<std::string> notes;
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
      notes = save_adapter_to(job, model, rope_factor, tmp, torch::kFloat32);
    });
    write_state();
  }
  fmt::print(stderr, "{}adapter written to {}\n", job.prefix, adapter);
  for (const auto& note : notes) fmt::print(stderr, "{}note: {}\n", job.prefix, note);
  fmt::print(stderr, "{}evaluate: lorafit eval --model {} --adapter {} --data FILE\n", job.prefix,
             job.recipe.model, adapter);
  fmt::print(stderr, "{}merge:    lorafit merge --model {} --adapter {} --out DIR\n", job.prefix,
             job.recipe.model, adapter);
}

void start_link_if_due(Job& job, LlamaForCausalLM& model, bool tty) {
  if (job.link >= job.knots.size() || job.state.step != job.knots[job.link]) return;
  const auto next =
      cola_link_settings(job.recipe.cola, adapter_settings(job.recipe.adapter), ++job.link);
  tie_knot(job.chain, model, *job.spec, job.settings, next, job.recipe.model);
  job.settings = next;
  new_optimizer(job, model);
  if (!job.writes) return;
  job.metrics
      << nlohmann::json{{"step", job.state.step}, {"knot", job.link}, {"r", job.settings.r}}.dump()
      << "\n";
  fmt::print(stderr, "{}{}step {}/{}  knot {}: link {} merged, link {} (r={}) starts\n",
             tty ? "\r\033[K" : "", job.prefix, job.state.step, job.total_steps, job.link, job.link,
             job.link + 1, job.settings.r);
}

double job_lr(const Job& job) {
  const auto& tr = job.recipe.train;
  double lr = scheduled_lr(tr, job.state.step, job.total_steps);
  const int64_t warmup = warmup_steps(tr, job.total_steps);
  if (job.recipe.cola.lr_restart == "rewarm" && job.link > 0 && warmup > 0) {
    lr *= std::min(1.0, static_cast<double>(job.state.step - job.knots[job.link - 1]) /
                            static_cast<double>(warmup));
  }
  return lr;
}

}  // namespace lorafit
