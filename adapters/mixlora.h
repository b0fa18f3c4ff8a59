// MixLoRA (arXiv 2404.15159, MoE-PEFT's `mixlora` routing): the frozen SwiGLU MLP becomes a
// sparse mixture of E experts that share its weights, each with its own LoRA on gate, up
// and/or down; an fp32 bias-free router picks the top k experts per token (softmax, top-k,
// renormalised) and the block's output is their weighted sum. Attention projections get a
// plain LoRA (adapters/lora.h).
#pragma once

#include <vector>

#include "adapters/lora.h"
#include "adapters/strategy.h"
#include "core/projection.h"

namespace lorafit {

struct MixLoraImpl : FfnAdapterImpl {
  /// `kinds`: which of gate_proj, up_proj, down_proj carry expert LoRAs (none: every expert is
  /// the base MLP, only the routing trains).
  MixLoraImpl(int64_t hidden,
              int64_t intermediate,
              int64_t experts,
              int64_t top_k,
              const std::vector<std::string>& kinds,
              int64_t r,
              double scaling,
              double dropout,
              const torch::TensorOptions& options);

  torch::Tensor forward(const torch::Tensor& x,
                        const torch::Tensor& gate_up,
                        const torch::Tensor& down) override;
  torch::Tensor take_backward_root() override;
  /// MoE-PEFT's "compatible" path: each expert gathers its tokens and recomputes gate and up
  /// for them (a host read per expert); `per_expert_base` selects it, for tests.
  /// weights, chosen: [N, k] renormalised top-k weights and their experts.
  torch::Tensor forward_per_expert(const torch::Tensor& x,
                                   const torch::Tensor& gate_up,
                                   const torch::Tensor& down,
                                   const torch::Tensor& weights,
                                   const torch::Tensor& chosen);

  torch::Tensor moe_gate;  // [E, C] fp32, the router
  // Expert e's LoRA on `kind`, or nullptr when that kind carries none: [kind][e].
  std::map<std::string, std::vector<Lora>> experts;
  int64_t top_k;
  int64_t intermediate;
  bool per_expert_base = false;
  // The router logits of the last forward in training, [N, E] fp32, for the auxiliary loss
  // (without a graph when the layer is checkpointed).
  torch::Tensor router_logits;
  // Checkpointed layers: d(aux loss)/d(routing probabilities) [N, E], set by the auxiliary
  // loss, turned into `backward_root` by the recomputing forward.
  torch::Tensor pending_router_grad;
  torch::Tensor backward_root;  // []
};
TORCH_MODULE(MixLora);

/// MoE-PEFT's load-balancing loss over the router logits of every layer, concatenated along
/// the tokens (not a sum of per-layer losses): coef * E * sum_{j,e} f[j,e] * P[e], with f[j,e]
/// the share of tokens whose j-th choice is e and P[e] the mean routing probability, both over
/// the tokens where `keep` is true (padding excluded; undefined: all tokens). Uniform routing
/// gives coef * k.
/// router_logits: L tensors [N, E]; keep: [N] bool -> [] fp32
torch::Tensor mixlora_aux_loss(const std::vector<torch::Tensor>& router_logits,
                               const torch::Tensor& keep,
                               int64_t top_k,
                               double coef);

/// A fresh MixLoRA: LoRA on the targeted attention projections; on every MLP a router and
/// experts with LoRAs on the targeted ones of gate_proj, up_proj, down_proj (B = 0, so the
/// model starts as the base).
void mixlora_attach_new(const AdapterSettings& settings, const AdapterSites& sites);

/// MoE-PEFT's adapter_config.json (peft_type MIXLORA, routing_strategy mixlora) and tensor
/// names: mixlora.layers.L.mlp.moe_gate.weight, mixlora.layers.L.mlp.KIND.experts.E.lora_{A,B}
/// .weight, mixlora.layers.L.self_attn.KIND.lora_{A,B}.weight; fp32.
SavedAdapter mixlora_save(const AdapterSettings& settings,
                          const AdapterSites& sites,
                          const std::string& base_model);

/// Reads what mixlora_save writes; other routing strategies, missing tensors and wrong shapes
/// are refused with the key or tensor named.
void mixlora_attach_saved(const nlohmann::json& config,
                          const TensorMap& weights,
                          const AdapterSites& sites,
                          const std::string& where);

/// The load-balancing loss of the last training forward over every MLP's router.
torch::Tensor mixlora_aux_loss(const AdapterSettings& settings,
                               const AdapterSites& sites,
                               const torch::Tensor& keep,
                               double scale);

/// {"expert_load": per layer, the share of the last forward's routed slots (tokens x k) that
/// went to each expert}: 1/E each when balanced.
nlohmann::json mixlora_step_metrics(const AdapterSettings& settings, const AdapterSites& sites);

/// MixLoRA's row of the strategy table: keys adapter.routing_strategy, num_experts, top_k,
/// router_aux_loss_coef (required), expert_r, expert_alpha, expert_dropout; not mergeable.
AdapterSpec mixlora_strategy();

}  // namespace lorafit
