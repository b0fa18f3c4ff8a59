// A training run, top to bottom: set up (model, data, adapter, optimizer, maybe a checkpoint
// to resume), then the step loop (micro-batches, one token-mean loss per optimizer step,
// clipping, AdamW), with logging, evaluation and checkpoints along the way.
#include "core/trainer.h"

#include <fmt/core.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <optional>

#include "core/adapter_io.h"
#include "core/cola.h"
#include "core/compat.h"
#include "core/datasets.h"
#include "core/device.h"
#include "core/errors.h"
#include "core/eval.h"
#include "core/loss_plot.h"
#include "core/merge.h"
#include "core/optimizer.h"
#include "core/safetensors.h"

namespace lorafit {

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

// Right-pads the rows to the longest, rounded up to a multiple of `pad_multiple` (S2-Attn's
// groups must split every batch's length).
Batch collate(const std::vector<Example>& examples,
              const std::vector<size_t>& rows,
              torch::Device device,
              size_t pad_multiple = 1) {
  size_t t = 0;
  for (auto r : rows) t = std::max(t, examples[r].input_ids.size());
  t = (t + pad_multiple - 1) / pad_multiple * pad_multiple;
  const auto b = static_cast<int64_t>(rows.size());
  std::vector<int64_t> ids(b * t, 0), labels(b * t, kIgnoreLabel);
  std::vector<uint8_t> keep(b * t, 0);
  Batch out;
  for (int64_t i = 0; i < b; ++i) {
    const auto& ex = examples[rows[i]];
    std::copy(ex.input_ids.begin(), ex.input_ids.end(), ids.begin() + i * t);
    std::copy(ex.labels.begin(), ex.labels.end(), labels.begin() + i * t);
    std::fill_n(keep.begin() + i * t, ex.input_ids.size(), 1);
    out.tokens += static_cast<int64_t>(ex.input_ids.size());
  }
  const auto ti = static_cast<int64_t>(t);
  // copy=true: on the CPU a plain .to() would keep viewing the local vectors.
  out.ids =
      torch::from_blob(ids.data(), {b, ti}, torch::kInt64).to(device, torch::kInt64, false, true);
  out.labels = torch::from_blob(labels.data(), {b, ti}, torch::kInt64)
                   .to(device, torch::kInt64, false, true);
  out.keep =
      torch::from_blob(keep.data(), {b, ti}, torch::kUInt8).to(device, torch::kBool, false, true);
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

// Summed negative log-likelihood of a batch's targets: position t predicts label t+1.
torch::Tensor nll_sum(LlamaForCausalLM& model, const Batch& batch) {
  const bool padded = batch.tokens < batch.ids.numel();
  auto hidden =
      model->forward(batch.ids, nullptr, padded ? batch.keep : torch::Tensor());  // [B, T, C]
  const auto b = hidden.size(0), t = hidden.size(1);
  // The last position predicts nothing; ignored targets are skipped inside the loss.
  auto targets = torch::cat(
      {batch.labels.narrow(1, 1, t - 1), torch::full({b, 1}, kIgnoreLabel, batch.labels.options())},
      1);  // [B, T]
  return -target_log_prob_sum(model, hidden.reshape({b * t, -1}), targets.reshape({-1}));
}

double validation_loss(LlamaForCausalLM& model,
                       const std::vector<Example>& examples,
                       int64_t micro_batch,
                       torch::Device device) {
  torch::NoGradGuard no_grad;
  model->eval();
  double nll = 0;
  int64_t count = 0;
  for (size_t start = 0; start < examples.size(); start += micro_batch) {
    std::vector<size_t> rows;
    for (size_t i = start; i < std::min(examples.size(), start + micro_batch); ++i)
      rows.push_back(i);
    nll += nll_sum(model, collate(examples, rows, device)).item<double>();
    count += target_count(examples, rows);
  }
  model->train();
  return nll / count;
}

std::string format_duration(double seconds) {
  const auto s = static_cast<int64_t>(seconds);
  return fmt::format("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60);
}

// What a checkpoint holds besides the adapter and the optimizer.
struct TrainerState {
  int64_t step = 0;
  DataPosition data;
};

void write_checkpoint(const fs::path& dir,
                      const TrainerState& state,
                      const AdamW& opt,
                      const std::function<void(const std::string&)>& save_adapter_to) {
  // Everything goes into a temporary folder that is renamed into place at the end: a run
  // killed at any moment leaves either the whole checkpoint or none.
  const fs::path tmp = dir.string() + ".tmp-" + std::to_string(::getpid());
  compat::remove_tree(tmp);
  fs::create_directories(tmp);
  save_adapter_to(tmp.string());
  opt.save((tmp / "optimizer.safetensors").string());
  torch::save(compat::cpu_rng_state(), (tmp / "rng.pt").string());
  nlohmann::json j = {
      {"step", state.step}, {"epoch", state.data.epoch}, {"cursor", state.data.cursor}};
  write_file_atomic((tmp / "trainer_state.json").string(), j.dump(2) + "\n");
  compat::remove_tree(dir);
  fs::rename(tmp, dir);
}

fs::path latest_checkpoint(const std::string& resume) {
  if (fs::exists(fs::path(resume) / "trainer_state.json")) return resume;
  const fs::path root = fs::path(resume) / "checkpoints";
  fs::path best;
  int64_t best_step = -1;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    const auto name = e.path().filename().string();
    if (name.rfind("step-", 0) != 0 || name.find(".tmp") != std::string::npos) continue;
    if (!fs::exists(e.path() / "trainer_state.json")) continue;
    const int64_t step = std::stoll(name.substr(5));
    if (step > best_step) best_step = step, best = e.path();
  }
  if (best.empty()) {
    throw IoError("--resume '" + resume +
                  "': no checkpoint found (expected trainer_state.json there "
                  "or checkpoints/step-N/ under it)");
  }
  return best;
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

}  // namespace

StepLoss accumulate_gradients(LlamaForCausalLM& model,
                              const std::vector<Batch>& micro_batches,
                              int64_t targets,
                              const AuxLoss& aux) {
  StepLoss step;
  auto add = [](torch::Tensor& sum, const torch::Tensor& x) {
    sum = sum.defined() ? sum + x.detach() : x.detach();
  };
  for (const auto& batch : micro_batches) {
    // Each micro-batch adds its share of the step's token mean, so the gradient is that of the
    // mean over every target token of the step, not a mean of micro-batch means.
    auto loss = nll_sum(model, batch) / static_cast<double>(std::max<int64_t>(1, targets));
    add(step.nll, loss);
    if (aux) {
      const auto share = aux(batch.keep.defined() ? batch.keep.reshape({-1}) : batch.keep,
                             1.0 / static_cast<double>(micro_batches.size()));
      if (share.defined()) {
        add(step.aux, share);
        loss = loss + share;
      }
    }
    loss.backward();
  }
  return step;
}

void use_longlora_attention(LlamaForCausalLM& model, const LongLoraRecipe& l) {
  if (!l.enabled) return;
  model->use_s2(l.group_ratio, l.shift == "roll"     ? S2Shift::Roll
                               : l.shift == "nowrap" ? S2Shift::NoWrap
                                                     : S2Shift::None);
}

double scheduled_lr(const TrainRecipe& t, int64_t step, int64_t total) {
  if (step < t.warmup_steps)
    return t.lr * static_cast<double>(step) / std::max<int64_t>(1, t.warmup_steps);
  const double span = static_cast<double>(std::max<int64_t>(1, total - t.warmup_steps));
  const double progress = static_cast<double>(step - t.warmup_steps) / span;
  if (t.schedule == "linear") return t.lr * std::max(0.0, static_cast<double>(total - step) / span);
  if (t.schedule == "cosine") return t.lr * std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * progress)));
  return t.lr;
}

void train(const Recipe& recipe, const TrainRun& run) {
  const auto& tr = recipe.train;
  const fs::path out = recipe.output;

  // --- Set-up: the data first (cheap, and its errors are the user's), then the model.
  const auto tokenizer = load_tokenizer(recipe.model);
  const auto config = load_llama_config(recipe.model);
  DatasetOptions data_opts{recipe.data.format,  recipe.data.max_seq_len,      recipe.data.packing,
                           config.bos_token_id, config.eos_token_ids.front(), config.vocab_size};
  const auto train_examples = load_examples(recipe.data.train, tokenizer, data_opts);
  const auto valid_examples = recipe.data.valid.empty()
                                  ? std::vector<Example>{}
                                  : load_examples(recipe.data.valid, tokenizer, data_opts);
  const int64_t total_steps =
      tr.steps > 0 ? tr.steps
                   : (tr.epochs * static_cast<int64_t>(train_examples.size()) + tr.batch_size - 1) /
                         tr.batch_size;

  // LongLoRA's position interpolation, checked before any weight loads.
  const double rope_factor =
      rope_scale_factor(recipe.longlora, recipe.data.max_seq_len, config.max_position_embeddings);
  check_rope_interpolation(config.rope, rope_factor,
                           "'longlora.rope_scale' for model '" + recipe.model + "'");
  const auto device = pick_device(recipe.device);
  torch::manual_seed(static_cast<uint64_t>(recipe.seed));
  auto model = load_llama(recipe.model, device, pick_dtype(recipe.dtype, device));
  model->interpolate_rope(rope_factor);
  const auto& spec = find_adapter(recipe.adapter.type);
  // COLA: knots split the steps into links, each with its own (maybe smaller) adapter.
  const auto knots =
      recipe.cola.enabled() ? cola_knot_steps(recipe.cola, total_steps) : std::vector<int64_t>{};
  size_t link = 0;  // knots tied so far
  AdapterSettings settings = cola_link_settings(recipe.cola, adapter_settings(recipe.adapter), 0);
  const auto sites = model->adapter_sites();
  spec.attach_new(settings, sites);
  ColaChain chain = recipe.cola.enabled() ? start_chain(model) : ColaChain{};
  AuxLoss aux_loss;
  if (spec.aux_loss) {
    aux_loss = [&](const torch::Tensor& keep, double scale) {
      return spec.aux_loss(settings, sites, keep, scale);
    };
  }
  model->checkpoint_layers = tr.gradient_checkpointing;
  // Base tensors that train: all of them (full fine-tuning), or LongLoRA's embeddings and
  // norms, the head excepted (a tied head keeps its own frozen copy).
  BaseFilter base_trains;
  if (spec.trains_base) base_trains = every_base_tensor;
  const auto& extra = recipe.longlora.trainable;
  const bool embed = std::count(extra.begin(), extra.end(), "embed") > 0;
  const bool norms = std::count(extra.begin(), extra.end(), "norm") > 0;
  if (recipe.longlora.enabled && (embed || norms)) {
    if (embed) model->untie_head();
    base_trains = [embed, norms](const std::string& name) {
      return (embed && name == "model.embed_tokens.weight") ||
             (norms && name.find("norm.weight") != std::string::npos);
    };
  }
  use_longlora_attention(model, recipe.longlora);
  // S2-Attn splits each batch into groups of group_ratio of its length, in halves.
  const size_t pad_multiple =
      recipe.longlora.enabled ? static_cast<size_t>(std::llround(2.0 / recipe.longlora.group_ratio))
                              : 1;
  AdamWSettings adamw;
  adamw.weight_decay = tr.weight_decay;
  std::optional<AdamW> optimizer;        // rebuilt, with fresh state, at every knot
  std::optional<MasterWeights> masters;  // of the trained base tensors not in fp32
  auto new_optimizer = [&] {
    auto params = trainable_parameters(model, base_trains);
    masters = masters_for(params);
    optimizer.emplace(params, adamw);
  };
  new_optimizer();
  // The trained base tensors by checkpoint name, as checkpoints and outputs hold them: their
  // fp32 masters where the model computes in a lower precision.
  auto trained_base = [&] {
    std::vector<std::pair<std::string, torch::Tensor>> out;
    for (auto& [name, t] : model->checkpoint_tensors()) {
      if (!base_trains || !base_trains(name)) continue;
      out.emplace_back(name, t);
      if (!masters) continue;
      for (size_t i = 0; i < masters->model.size(); ++i)
        if (masters->model[i].is_same(t)) out.back().second = masters->masters[i];
    }
    return out;
  };
  // What a checkpoint or the run's output holds of the model: the adapter (with LongLoRA's
  // trained embeddings and norms), or (full fine-tuning) the whole model as a Hugging Face
  // checkpoint.
  auto save_adapter_to = [&](const std::string& dir, torch::Dtype full_dtype) {
    if (spec.trains_base) {
      fs::create_directories(dir);
      write_model_files(dir, trained_base(), recipe.model, full_dtype);
    } else {
      auto saved = spec.save(settings, model->adapter_sites(), recipe.model);
      add_modules_to_save(saved, trained_base());
      if (rope_factor > 1) saved.config["rope_scaling"] = linear_rope_scaling(rope_factor);
      write_adapter_files(dir, saved);
    }
    if (recipe.cola.enabled()) save_chain(dir, chain);
  };
  // Overwrites the trained tensors with those saved in `dir` (same keys and shapes).
  auto copy_adapter_weights = [&](const std::string& dir) {
    torch::NoGradGuard no_grad;
    if (spec.trains_base) {
      SafetensorsCheckpoint saved(dir);
      for (auto& [name, t] : trained_base()) t.copy_(saved.tensor(name));
      if (masters) masters->publish();
      return;
    }
    SafetensorsFile saved((fs::path(dir) / "adapter_model.safetensors").string());
    auto trained = spec.save(settings, model->adapter_sites(), recipe.model).tensors;
    for (auto& [name, t] : trained_base()) trained["base_model.model." + name] = t;
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
    if (masters) masters->publish();
  };
  if (!recipe.adapter.init.empty()) copy_adapter_weights(recipe.adapter.init);

  // Only now, with data and model loaded, does the run write anything.
  fs::create_directories(out / "checkpoints");
  write_file_atomic((out / "recipe.yaml").string(), recipe_to_yaml(recipe));

  TrainerState state;
  if (!run.resume.empty()) {
    const auto ckpt = latest_checkpoint(run.resume);
    const auto j = nlohmann::json::parse(std::ifstream(ckpt / "trainer_state.json"));
    state.step = j.at("step");
    state.data = {j.at("epoch"), j.at("cursor")};
    if (recipe.cola.enabled()) {
      load_chain(ckpt.string(), chain, model);
      link = chain.links.size();
      settings = cola_link_settings(recipe.cola, adapter_settings(recipe.adapter), link);
      spec.attach_new(settings, sites);
      new_optimizer();
    }
    copy_adapter_weights(ckpt.string());
    optimizer->load((ckpt / "optimizer.safetensors").string());
    torch::Tensor rng;
    torch::load(rng, (ckpt / "rng.pt").string());
    compat::set_cpu_rng_state(rng);
    truncate_metrics(out / "metrics.jsonl", state.step);
    fmt::print(stderr, "resuming from {} (step {})\n", ckpt.string(), state.step);
  }

  ExampleStream stream(train_examples.size(), static_cast<uint64_t>(recipe.seed), state.data,
                       recipe.data.shuffle);
  std::ofstream metrics(out / "metrics.jsonl", std::ios::app);
  LossHistory history = read_loss_history((out / "metrics.jsonl").string());
  const bool tty = isatty(STDERR_FILENO);
  const auto started = Clock::now();
  int64_t tokens_since_log = 0;
  auto log_started = Clock::now();
  const int64_t first_step = state.step;
  model->train();

  // --- The step loop.
  while (state.step < total_steps) {
    if (link < knots.size() && state.step == knots[link]) {
      // COLA: merge the link into the base, start the next with a fresh optimizer.
      const auto next = cola_link_settings(recipe.cola, adapter_settings(recipe.adapter), ++link);
      tie_knot(chain, model, spec, settings, next, recipe.model);
      settings = next;
      new_optimizer();
      metrics << nlohmann::json{{"step", state.step}, {"knot", link}, {"r", settings.r}}.dump()
              << "\n";
      fmt::print(stderr, "{}step {}/{}  knot {}: link {} merged, link {} (r={}) starts\n",
                 tty ? "\r\033[K" : "", state.step, total_steps, link, link, link + 1, settings.r);
    }
    const auto rows = stream.next(tr.batch_size);
    const int64_t targets = target_count(train_examples, rows);
    std::vector<Batch> micro_batches;
    for (int64_t start = 0; start < tr.batch_size; start += tr.micro_batch_size) {
      const std::vector<size_t> micro(rows.begin() + start,
                                      rows.begin() + start + tr.micro_batch_size);
      micro_batches.push_back(collate(train_examples, micro, device, pad_multiple));
      tokens_since_log += micro_batches.back().tokens;
    }
    // Reading the loss waits for the backward pass, once per step: a non-finite loss must stop
    // the run before the update.
    const auto step_loss = accumulate_gradients(model, micro_batches, targets, aux_loss);
    const double loss_sum = step_loss.nll.item<double>();
    const double aux_sum = step_loss.aux.defined() ? step_loss.aux.item<double>() : 0.0;
    if (!std::isfinite(loss_sum + aux_sum)) {
      throw Error(
          fmt::format("the training loss became {} at step {}; the last good checkpoint is "
                      "under {} (hint: lower train.lr or raise train.warmup_steps)",
                      loss_sum, state.step + 1, (out / "checkpoints").string()));
    }
    double lr = scheduled_lr(tr, state.step, total_steps);
    if (recipe.cola.lr_restart == "rewarm" && link > 0 && tr.warmup_steps > 0) {
      lr *= std::min(1.0, static_cast<double>(state.step - knots[link - 1]) /
                              static_cast<double>(tr.warmup_steps));
    }
    if (masters) masters->take_grads();
    const auto grad_norm = optimizer->step(lr, tr.max_grad_norm);  // [] or undefined
    if (masters) masters->publish();
    ++state.step;
    state.data = stream.position();

    const bool log_step = state.step % tr.log_every == 0 || state.step == total_steps;
    if (log_step || tty) {
      const double secs = std::chrono::duration<double>(Clock::now() - log_started).count();
      const double tok_s = tokens_since_log / std::max(secs, 1e-9);
      const double done = std::chrono::duration<double>(Clock::now() - started).count();
      const double eta = done / (state.step - first_step) * (total_steps - state.step);
      // A terminal gets one line updated every step; a pipe gets a line per log step.
      fmt::print(stderr, "{}step {}/{}  loss {:.4f}  lr {:.3e}  {:.0f} tok/s  ETA {}{}",
                 tty ? "\r\033[K" : "", state.step, total_steps, loss_sum, lr, tok_s,
                 format_duration(eta), tty ? "" : "\n");
      if (log_step) {
        nlohmann::json line{{"step", state.step},
                            {"loss", loss_sum},
                            {"lr", lr},
                            {"grad_norm", grad_norm.defined() ? grad_norm.item<double>() : 0.0},
                            {"tokens_per_s", tok_s}};
        if (step_loss.aux.defined()) line["aux_loss"] = aux_sum;
        if (spec.step_metrics) line.update(spec.step_metrics(settings, sites));
        metrics << line.dump() << "\n" << std::flush;
        history.train.emplace_back(state.step, loss_sum);
        tokens_since_log = 0;
        log_started = Clock::now();
      }
    }
    if (!valid_examples.empty() && tr.eval_every > 0 &&
        (state.step % tr.eval_every == 0 || state.step == total_steps)) {
      const double v = validation_loss(model, valid_examples, tr.micro_batch_size, device);
      metrics << nlohmann::json{{"step", state.step}, {"eval_loss", v}}.dump() << "\n"
              << std::flush;
      history.valid.emplace_back(state.step, v);
      fmt::print(stderr, "{}step {}/{}  eval_loss {:.4f}\n", tty ? "\r\033[K" : "", state.step,
                 total_steps, v);
    }
    if (tr.save_every > 0 && state.step % tr.save_every == 0 && state.step < total_steps) {
      write_checkpoint(out / "checkpoints" / ("step-" + std::to_string(state.step)), state,
                       *optimizer, [&](const std::string& dir) {
                         save_adapter_to(dir, torch::kFloat32);  // resumes exactly
                       });
    }
  }
  if (tty) fmt::print(stderr, "\n");

  // --- Outputs.
  write_file_atomic((out / "loss.svg").string(), loss_svg(history));
  if (spec.trains_base) {
    const fs::path dir = out / "model", tmp = dir.string() + ".tmp-" + std::to_string(::getpid());
    compat::remove_tree(tmp);
    save_adapter_to(tmp.string(), checkpoint_dtype(recipe.model));
    compat::remove_tree(dir);
    fs::rename(tmp, dir);
    fmt::print(stderr, "model written to {}\n", dir.string());
    fmt::print(stderr, "evaluate: lorafit eval --model {} --data FILE\n", dir.string());
    return;
  }
  const auto adapter = (out / "adapter").string();
  if (recipe.cola.enabled()) {
    // The chain as one PEFT LoRA, and every link (the last one still attached) on its own.
    write_adapter_files(adapter, chain_adapter(chain, model, settings, recipe.model));
    chain.links.push_back(spec.save(settings, sites, recipe.model));
    save_chain(out.string(), chain);
    fmt::print(stderr, "chain of {} links written to {} (each link under {})\n", chain.links.size(),
               adapter, (out / "links").string());
  } else {
    save_adapter_to(adapter, torch::kFloat32);
  }
  fmt::print(stderr, "adapter written to {}\n", adapter);
  fmt::print(stderr, "evaluate: lorafit eval --model {} --adapter {} --data FILE\n", recipe.model,
             adapter);
  fmt::print(stderr, "merge:    lorafit merge --model {} --adapter {} --out DIR\n", recipe.model,
             adapter);
}

}  // namespace lorafit
