#include "cli/model_options.h"

#include "core/adapter_io.h"
#include "core/device.h"

namespace lorafit::cli {

void add_model_options(CLI::App* cmd, ModelOptions& o) {
  cmd->add_option("--model", o.model, "Hugging Face model folder")->required();
  cmd->add_option("--adapter", o.adapter, "adapter folder (PEFT format), applied unmerged");
  cmd->add_option("--device", o.device, "auto | cpu | cuda")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  cmd->add_option("--dtype", o.dtype,
                  "base weights: auto (bf16 on cuda, f32 on cpu) | bf16 | f16 | f32")
      ->check(CLI::IsMember({"auto", "bf16", "f16", "f32"}));
  cmd->add_option("--quantize", o.quantize,
                  "frozen projection weights: none | nf4 (QLoRA's 4-bit NormalFloat)")
      ->check(CLI::IsMember({"none", "nf4"}));
}

LlamaForCausalLM load_model(const ModelOptions& o) {
  const auto device = pick_device(o.device);
  auto model = load_llama(o.model, device, pick_dtype(o.dtype, device),
                          parse_quantize(o.quantize, "--quantize"));
  if (!o.adapter.empty()) load_adapter(o.adapter, model);
  return model;
}

}  // namespace lorafit::cli
