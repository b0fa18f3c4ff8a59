#include "core/bench.h"

#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <optional>

#include "adapters/job_routing.h"
#include "adapters/registry.h"
#include "core/adapter_io.h"
#include "core/batching.h"
#include "core/compat.h"
#include "core/device.h"
#include "core/errors.h"
#include "core/optimizer.h"
#include "core/step_graphs.h"
#include "core/trainer.h"
#include "tokenizer/tokenizer.h"

namespace lorafit {

namespace {

// Dense bf16 matrix throughput of an H100/H200 as measured on the GPU machine (8192^3 GEMM).
constexpr double kPeakFlops = 798e12;

// Model FLOPs per trained token: 2N forward and 2N for the input gradients of the frozen
// matrices (4N; one more forward, 6N, when layers are recomputed; 2N more for the weights'
// gradients in full fine-tuning), plus causal attention (forward 2*T*H*D per layer and token,
// backward twice that, recomputation once more; S2-Attn's groups see `attention_share` of the
// keys that full attention does).
double flops_per_token(const LlamaForCausalLM& model,
                       int64_t seq,
                       bool checkpointing,
                       bool full,
                       double attention_share) {
  const auto& c = model->config;
  double matmul = 0;
  for (const auto& p : model->projections())
    matmul += static_cast<double>(p->in_features) * p->out_features;
  matmul += static_cast<double>(c.hidden_size) * c.vocab_size;  // the head
  const double attn =
      2.0 * seq * attention_share * c.num_attention_heads * c.head_dim * c.num_hidden_layers;
  return ((checkpointing ? 6 : 4) + (full ? 2 : 0)) * matmul + (checkpointing ? 4 : 3) * attn;
}

}  // namespace

BenchResult run_bench(const BenchOptions& o) {
  Recipe base;
  base.model = base.output = base.data.train = "bench";
  base.train.steps = 1;
  base.adapter.dropout = 0.0;
  const Recipe recipe = override_recipe(base, o.overrides);

  if (o.jobs > 1 && find_adapter(recipe.adapter.type).trains_base)
    throw ConfigError(
        fmt::format("bench --jobs {}: adapter.type '{}' trains the base, which "
                    "fused jobs share; hint: bench one job, or jobs of an adapter",
                    o.jobs, recipe.adapter.type));
  const auto device = pick_device(o.device);
  if (recipe.train.cuda_graphs) StepGraphs::check(device, 1);
  const auto dtype = pick_dtype(recipe.dtype, device);
  torch::manual_seed(static_cast<uint64_t>(recipe.seed));
  const auto quantize = parse_quantize(recipe.quantize, "quantize");
  auto model = o.model.empty() ? random_llama(builtin_shape(o.shape), device, dtype, 0, quantize)
                               : load_llama(o.model, device, dtype, quantize);
  use_recipe_layers(model, recipe);
  const auto& spec = find_adapter(recipe.adapter.type);
  const auto settings = adapter_settings(recipe.adapter);
  // As the trainer fuses jobs: each attaches its own adapter to its own view of the sites and
  // steps its own optimizer; every micro-batch holds each job's rows, one base GEMM for all.
  const auto jobs = static_cast<size_t>(o.jobs);
  auto routing = route_jobs(model->adapter_sites(), jobs);
  std::vector<AuxLoss> aux(jobs);
  std::vector<AdamW> optimizers;
  optimizers.reserve(jobs);
  std::vector<std::optional<MasterWeights>> masters;
  for (size_t j = 0; j < jobs; ++j) {
    const auto& sites = routing.sites[j];
    spec.attach_new(settings, sites);
    if (spec.aux_loss)
      aux[j] = [&spec, &settings, &sites](const torch::Tensor& keep, double scale) {
        return spec.aux_loss(settings, sites, keep, scale);
      };
    auto params =
        trainable_parameters(model, sites, spec.trains_base ? every_base_tensor : BaseFilter());
    masters.push_back(masters_for(params));  // as the trainer: fp32 masters of a bf16 full model
    optimizers.emplace_back(params, AdamWSettings{});
  }
  routing.place_routers();
  model->train();
  std::optional<StepGraphs> graphs;
  if (recipe.train.cuda_graphs) {
    std::vector<torch::Tensor> trainable;
    for (size_t j = 0; j < jobs; ++j)
      for (auto& t : gradient_tensors(optimizers[j], masters[j])) trainable.push_back(t);
    graphs.emplace(device, std::move(trainable));
  }

  const bool micro_set = std::any_of(
      o.overrides.begin(), o.overrides.end(),
      [](const std::string& kv) { return kv.rfind("train.micro_batch_size=", 0) == 0; });
  const int64_t micro = micro_set ? std::min(o.batch, recipe.train.micro_batch_size) : o.batch;
  // Each step's micro-batches: the same random rows every step, or each job's next rows of
  // --data, collated in the step as the trainer does.
  std::vector<Example> random_rows, examples;
  if (o.data.empty()) {
    const auto ids = torch::randint(0, model->config.vocab_size, {o.seq}, torch::kInt64);
    random_rows.push_back({{ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + o.seq}, {}, {}});
    random_rows[0].labels = random_rows[0].input_ids;
  } else {
    const auto& d = recipe.data;
    const auto tokenizer = o.model.empty() ? std::optional<Tokenizer>() : load_tokenizer(o.model);
    DatasetOptions options;
    if (tokenizer) {
      options = dataset_options(*tokenizer, model->config, d.format, d.max_seq_len,
                                parse_packing(d.packing), d.chat_template);
    } else {
      options.format = d.format, options.max_seq_len = d.max_seq_len;
      options.packing = parse_packing(d.packing), options.vocab_size = model->config.vocab_size;
    }
    examples = load_examples(o.data, tokenizer ? &*tokenizer : nullptr, options);
  }
  std::vector<ExampleStream> streams;  // each job's order of --data's rows
  for (size_t j = 0; !examples.empty() && j < jobs; ++j)
    streams.emplace_back(examples.size(), recipe.seed + j);
  const size_t pad_multiple = batch_length_multiple(recipe.longlora);
  int64_t real = 0, slots = 0;  // the timed steps' tokens, without and with padding
  BenchResult r;
  auto step = [&] {
    std::vector<std::vector<size_t>> rows(jobs);
    std::vector<int64_t> targets(jobs);
    const auto& source = o.data.empty() ? random_rows : examples;
    for (size_t j = 0; j < jobs; ++j) {
      rows[j] = o.data.empty() ? std::vector<size_t>(o.batch, 0) : streams[j].next(o.batch);
      targets[j] = target_count(source, rows[j]);
    }
    std::vector<StepLoss> losses(jobs);
    const double share = static_cast<double>(micro) / static_cast<double>(o.batch);
    for (int64_t done = 0; done < o.batch; done += micro) {
      const auto n = std::min(micro, o.batch - done);
      std::vector<BatchPart> group;
      std::vector<JobRows::Span> spans;
      std::vector<StepPart> parts;
      for (size_t j = 0; j < jobs; ++j) {
        group.push_back({&source, {rows[j].begin() + done, rows[j].begin() + done + n}, j});
        spans.push_back({j, n});
        parts.push_back({n, targets[j], &aux[j], share, &losses[j]});
      }
      const auto batch = collate(group, device, pad_multiple);
      routing.set_rows(spans);
      if (graphs) {
        graphs->forward_backward(model, batch, spans, parts);
      } else {
        forward_backward(model, batch, parts);
      }
      real += batch.tokens;
      slots += batch.ids.numel();
    }
    // As the trainer: the loss is read (waiting for the backward pass) before the updates.
    r.loss = losses.front().nll.item<double>();
    for (size_t j = 0; j < jobs; ++j)
      apply_update(optimizers[j], masters[j], recipe.train.lr, recipe.train.max_grad_norm);
  };
  // A graph's memory is allocated once, when it is captured in a warm-up step, and stays in
  // its pool: replays allocate nothing, so the captures' peak counts as well.
  if (graphs) compat::reset_peak_memory(device);
  for (int64_t i = 0; i < o.warmup_steps; ++i) step();
  const int64_t warm_passes = graphs ? graphs->passes() : 0;
  const int64_t warm_replays = graphs ? graphs->replayed() : 0;
  compat::synchronize(device);
  const double capture_peak = graphs ? compat::peak_memory_gib(device) : 0.0;
  const double capture_reserved = graphs ? compat::peak_reserved_gib(device) : 0.0;
  compat::reset_peak_memory(device);
  if (!o.profile.empty()) compat::profile_start();
  real = slots = 0;
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < o.steps; ++i) step();
  compat::synchronize(device);
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  if (!o.profile.empty()) compat::profile_stop(o.profile);
  r.step_ms = secs / o.steps * 1e3;
  r.tokens_per_s = static_cast<double>(real) / secs;
  r.padding = 1.0 - static_cast<double>(real) / static_cast<double>(slots);
  if (graphs)
    r.graphed = static_cast<double>(graphs->replayed() - warm_replays) /
                static_cast<double>(std::max<int64_t>(1, graphs->passes() - warm_passes));
  // Attention's FLOPs at the rows' mean length (packed records see less of it).
  const int64_t seq = o.data.empty() ? o.seq : slots / (o.steps * o.batch * o.jobs);
  r.peak_mem_gib = std::max(compat::peak_memory_gib(device), capture_peak);
  r.peak_reserved_gib = std::max(compat::peak_reserved_gib(device), capture_reserved);
  r.mfu =
      device.is_cuda()
          ? r.tokens_per_s *
                flops_per_token(model, seq, recipe.train.gradient_checkpointing, spec.trains_base,
                                recipe.longlora.enabled ? recipe.longlora.group_ratio : 1.0) /
                kPeakFlops
          : 0.0;
  for (const auto& opt : optimizers)
    for (const auto& p : opt.params) r.trainable_params += p.numel();
  r.micro_batch = micro;
  r.device = device.str();
  return r;
}

}  // namespace lorafit
