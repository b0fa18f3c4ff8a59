#include "adapters/mixlora.h"

#include <cmath>

namespace lorafit {

MixLoraImpl::MixLoraImpl(int64_t hidden,
                         int64_t intermediate_,
                         int64_t n_experts,
                         int64_t top_k_,
                         const std::vector<std::string>& kinds,
                         int64_t r,
                         double scaling,
                         double dropout,
                         const torch::TensorOptions& options)
    : top_k(top_k_), intermediate(intermediate_) {
  const auto o = options.dtype(torch::kFloat32);
  moe_gate = register_parameter("moe_gate", torch::empty({n_experts, hidden}, o));
  {
    torch::NoGradGuard no_grad;
    moe_gate.normal_(0.0, 0.02);  // MoE-PEFT's router_init_range
  }
  // Parameters named as MoE-PEFT names them: gate_proj.experts.3.lora_A, ...
  for (const auto& kind : kinds) {
    const bool down = kind == "down_proj";
    auto kind_module = register_module(kind, std::make_shared<torch::nn::Module>());
    auto list = kind_module->register_module("experts", std::make_shared<torch::nn::Module>());
    auto& slots = experts[kind];
    for (int64_t e = 0; e < n_experts; ++e) {
      slots.push_back(Lora(down ? intermediate : hidden, down ? hidden : intermediate, r, scaling,
                           dropout, options));
      list->register_module(std::to_string(e), slots.back());
    }
  }
}

namespace {

// base + s * (dropout(x) A^T) B^T for one expert's LoRA, or base when there is none.
// x: [n, in], base: [n, out]
torch::Tensor with_lora(const torch::Tensor& x, const torch::Tensor& base, const Lora* lora) {
  if (!lora) return base;
  const auto f = (*lora)->low_rank(x.scalar_type());
  const auto h =
      f->dropout > 0 && (*lora)->is_training() ? torch::dropout(x, f->dropout, /*train=*/true) : x;
  return base +
         torch::nn::functional::linear(torch::nn::functional::linear(h, f->a), f->b) * f->scaling;
}

}  // namespace

torch::Tensor MixLoraImpl::forward(const torch::Tensor& x,
                                   const torch::Tensor& gate_up,
                                   const torch::Tensor& down) {
  const auto n_experts = moe_gate.size(0);
  // The router and the sum of the experts' outputs in (at least) fp32, as MoE-PEFT.
  const auto acc = c10::promoteTypes(x.scalar_type(), torch::kFloat32);
  auto logits = torch::nn::functional::linear(x.to(moe_gate.scalar_type()), moe_gate);  // [N, E]
  if (is_training()) router_logits = logits;
  auto [weights, chosen] = torch::softmax(logits, -1).topk(top_k, -1);  // [N, k] each
  weights = weights / weights.sum(-1, /*keepdim=*/true);
  // Gate and up once for every token; each expert slices its own rows.
  const auto all_gate_up =
      per_expert_base ? torch::Tensor() : torch::nn::functional::linear(x, gate_up);  // [N, 2I]
  auto out = torch::zeros({x.size(0), x.size(1)}, x.options().dtype(acc));
  auto lora_of = [&](const std::string& kind, int64_t e) -> const Lora* {
    const auto it = experts.find(kind);
    return it == experts.end() ? nullptr : &it->second[e];
  };
  for (int64_t e = 0; e < n_experts; ++e) {
    const auto picked = chosen.eq(e);                       // [N, k]
    const auto rows = picked.any(-1).nonzero().squeeze(1);  // [n]
    if (rows.numel() == 0) continue;
    const auto xe = x.index_select(0, rows);  // [n, C]
    const auto gu = per_expert_base ? torch::nn::functional::linear(xe, gate_up)
                                    : all_gate_up.index_select(0, rows);  // [n, 2I]
    const auto g = with_lora(xe, gu.narrow(-1, 0, intermediate), lora_of("gate_proj", e));
    const auto u = with_lora(xe, gu.narrow(-1, intermediate, intermediate), lora_of("up_proj", e));
    const auto a = torch::silu(g) * u;  // [n, I]
    const auto y = with_lora(a, torch::nn::functional::linear(a, down), lora_of("down_proj", e));
    const auto w = (weights * picked).sum(-1).index_select(0, rows).unsqueeze(1);  // [n, 1]
    out.index_add_(0, rows, y.to(acc) * w.to(acc));
  }
  return out.to(x.scalar_type());
}

torch::Tensor mixlora_aux_loss(const std::vector<torch::Tensor>& router_logits,
                               const torch::Tensor& keep,
                               int64_t top_k,
                               double coef) {
  const auto z = torch::cat(router_logits, 0);  // [L*N, E]
  const auto n_experts = z.size(1);
  const auto p = torch::softmax(z, -1);
  const auto chosen = std::get<1>(p.topk(top_k, -1));                          // [L*N, k]
  const auto one_hot = torch::one_hot(chosen, n_experts).to(torch::kFloat32);  // [L*N, k, E]
  torch::Tensor weight;  // [L*N] 1 for counted tokens, 0 for padding
  if (keep.defined()) {
    weight = keep.to(torch::kFloat32).repeat({static_cast<int64_t>(router_logits.size())});
  } else {
    weight = torch::ones({z.size(0)}, z.options());
  }
  const auto count = weight.sum();
  const auto f = (one_hot * weight.view({-1, 1, 1})).sum(0) / count;  // [k, E]
  const auto mean_p = (p * weight.unsqueeze(1)).sum(0) / count;       // [E]
  return coef * static_cast<double>(n_experts) * (f * mean_p.unsqueeze(0)).sum();
}

}  // namespace lorafit
