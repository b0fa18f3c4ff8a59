// `lorafit bench`: training-step throughput and memory, as a line or as JSON.
#include <fmt/core.h>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/bench.h"

namespace lorafit::cli {

Action add_bench(CLI::App& app) {
  auto o = std::make_shared<BenchOptions>();
  auto json = std::make_shared<bool>(false);
  auto* cmd =
      app.add_subcommand("bench", "time training steps on a built-in shape or a checkpoint");
  auto* shape = cmd->add_option("--shape", o->shape, "random weights of a built-in shape")
                    ->check(CLI::IsMember({"tiny", "llama-1b", "llama2-7b", "llama3-8b"}));
  auto* model = cmd->add_option("--model", o->model, "a Hugging Face model folder instead");
  shape->excludes(model);
  cmd->add_option("--seq", o->seq, "tokens per sequence")->check(in_range(2, 1 << 20));
  cmd->add_option("--data", o->data,
                  "train the rows of this dataset, read as data.format, data.max_seq_len and "
                  "data.packing say (--set); with --shape, format tokens")
      ->check(CLI::ExistingFile);
  cmd->add_option("--batch", o->batch,
                  "sequences per step, of each job, in one forward pass (fewer a pass with "
                  "--set train.micro_batch_size)")
      ->check(in_range(1));
  cmd->add_option("--jobs", o->jobs, "fused jobs on the one base, each its own adapter and rows")
      ->check(in_range(1, 64));
  cmd->add_option("--set", o->overrides,
                  "recipe keys: --set adapter.r=8 --set train.gradient_checkpointing=true");
  cmd->add_option("--device", o->device, "auto | cpu | cuda")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  auto quantize = std::make_shared<std::string>();
  cmd->add_option("--quantize", *quantize, "frozen projection weights: none | nf4 (QLoRA)")
      ->check(CLI::IsMember({"none", "nf4"}));
  cmd->add_option("--steps", o->steps, "timed steps")->check(in_range(1));
  cmd->add_option("--warmup", o->warmup_steps, "untimed steps first")->check(in_range(0));
  cmd->add_option("--profile", o->profile,
                  "write a Chrome trace of the timed steps here (LibTorch 2.x)");
  cmd->add_flag("--json", *json, "print the result as JSON");
  return [o, json, shape, model, quantize] {
    if (shape->count() == 0 && model->count() == 0) o->shape = "tiny";
    if (!quantize->empty()) o->overrides.push_back("quantize=" + *quantize);
    const auto r = run_bench(*o);
    if (*json) {
      fmt::print("{}\n", nlohmann::json{{"tokens_per_s", r.tokens_per_s},
                                        {"padding", r.padding},
                                        {"graphed", r.graphed},
                                        {"step_ms", r.step_ms},
                                        {"peak_mem_gib", r.peak_mem_gib},
                                        {"peak_reserved_gib", r.peak_reserved_gib},
                                        {"mfu", r.mfu},
                                        {"loss", r.loss},
                                        {"trainable_params", r.trainable_params},
                                        {"device", r.device},
                                        {"seq", o->seq},
                                        {"batch", o->batch},
                                        {"micro_batch", r.micro_batch},
                                        {"jobs", o->jobs}}
                             .dump());
    } else {
      fmt::print(
          "{:.0f} tokens/s  {:.1f} ms/step  peak {:.2f} GiB  MFU {:.3f}  loss {:.4f}  padding "
          "{:.1f}%{}  ({} trainable, {})\n",
          r.tokens_per_s, r.step_ms, r.peak_mem_gib, r.mfu, r.loss, 100 * r.padding,
          r.graphed > 0 ? fmt::format("  graphed {:.0f}%", 100 * r.graphed) : "",
          r.trainable_params, r.device);
    }
  };
}

}  // namespace lorafit::cli
