// `lorafit generate`: continue a prompt, with or without an adapter.
#include <fmt/core.h>

#include <iostream>
#include <iterator>

#include "cli/commands.h"
#include "core/adapter_io.h"
#include "core/device.h"
#include "core/generate.h"
#include "tokenizer/tokenizer.h"

namespace lorafit::cli {

namespace {

struct GenerateCmd {
  std::string model;
  std::string adapter;
  std::string prompt;
  std::string device = "auto";
  std::string dtype = "auto";
  GenerateOptions options;
};

void run_generate(const GenerateCmd& o) {
  std::string prompt = o.prompt;
  if (prompt == "-") prompt.assign(std::istreambuf_iterator<char>(std::cin), {});
  const auto device = pick_device(o.device);
  const auto tokenizer = load_tokenizer(o.model);
  auto model = load_llama(o.model, device, pick_dtype(o.dtype, device));
  if (!o.adapter.empty()) load_adapter(o.adapter, model);
  std::vector<int64_t> ids{model->config.bos_token_id};
  for (auto id : tokenizer.encode(prompt)) ids.push_back(id);
  const auto out = generate(model, ids, o.options);
  fmt::print("{}\n", tokenizer.decode(out));
}

}  // namespace

Action add_generate(CLI::App& app) {
  auto o = std::make_shared<GenerateCmd>();
  auto* cmd = app.add_subcommand("generate", "continue a prompt (KV cache; greedy or sampled)");
  cmd->add_option("--model", o->model, "Hugging Face model folder")->required();
  cmd->add_option("--adapter", o->adapter, "adapter folder, applied unmerged");
  cmd->add_option("--prompt", o->prompt, "prompt text, or - to read standard input")->required();
  cmd->add_option("--max-new-tokens", o->options.max_new_tokens, "stop after N new tokens")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--temperature", o->options.temperature, "0 for greedy decoding")
      ->check(CLI::Range(0.0, 100.0));
  cmd->add_option("--top-p", o->options.top_p, "nucleus sampling threshold")->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--seed", o->options.seed, "sampling seed");
  cmd->add_option("--device", o->device, "auto | cpu | cuda")->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  cmd->add_option("--dtype", o->dtype, "auto | bf16 | f16 | f32")->check(CLI::IsMember({"auto", "bf16", "f16", "f32"}));
  return [o] { run_generate(*o); };
}

}  // namespace lorafit::cli
