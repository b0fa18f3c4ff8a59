#include "adapters/mixlora.h"

#include <algorithm>
#include <cmath>
#include <functional>

#include "core/errors.h"
#include "core/fused_ops.h"

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
  return lora ? adapted_output(*Lora(*lora), x, base) : base;
}

// The experts' LoRAs of one kind side by side, cast once to the compute dtype (they share r,
// scaling and dropout): every slot's input goes through all E experts' A (E*r columns, a
// sliver of the base GEMM's), the columns of experts other than the slot's are zeroed, and
// the stacked s*B map back. No slot is gathered by expert, so nothing waits for the GPU to
// say how many tokens each expert got.
struct StackedExperts {
  torch::Tensor a;  // [E*r, in]
  torch::Tensor b;  // [out, E*r], scaling folded in
  double dropout;
  int64_t experts;

  StackedExperts(const std::vector<Lora>& loras, torch::ScalarType dtype) {
    std::vector<torch::Tensor> as, bs;
    for (const auto& lora : loras) {
      as.push_back(lora->lora_A);
      bs.push_back(lora->lora_B);
    }
    const auto& first = *loras.front();
    a = torch::cat(as, 0).to(dtype);
    b = (torch::cat(bs, 1) * first.scaling).to(dtype);
    dropout = first.is_training() ? first.dropout : 0.0;
    experts = static_cast<int64_t>(loras.size());
  }

  // Each (token, expert) pair draws its own dropout mask, as separate experts would.
  // in: [N, k or 1, D] (1: the k slots of a token share their input) -> [N, k, E, r]
  torch::Tensor down(const torch::Tensor& in, int64_t k) const {
    const auto n = in.size(0);
    const auto x = dropout > 0 ? torch::dropout(in.expand({n, k, in.size(2)}), dropout, true) : in;
    return torch::nn::functional::linear(x, a).view({n, -1, experts, a.size(0) / experts});
  }
};

// Every slot's s_e * (dropout(in) A_e^T) B_e^T for its own expert e.
// in: [N, k or 1, D], pick: [N, k, E] one-hot -> [N, k, out]
torch::Tensor expert_deltas(const StackedExperts& stack,
                            const torch::Tensor& in,
                            const torch::Tensor& pick) {
  const auto n = in.size(0), k = pick.size(1);
  const auto h = stack.down(in, k) * pick.unsqueeze(-1);                 // [N, k, E, r]
  return torch::nn::functional::linear(h.reshape({n, k, -1}), stack.b);  // [N, k, out]
}

// sum_j w_j * (slot j's expert delta), the slots' mix taken at the r-wide middle, before B.
// in: [N, k, D], coef: [N, k, E], w_j on the slot's expert, in the weights' dtype -> [N, out]
torch::Tensor mixed_expert_delta(const StackedExperts& stack,
                                 const torch::Tensor& in,
                                 const torch::Tensor& coef) {
  const auto n = in.size(0), k = coef.size(1);
  const auto h = (stack.down(in, k).to(coef.scalar_type()) * coef.unsqueeze(-1)).sum(1);
  return torch::nn::functional::linear(h.view({n, -1}).to(in.scalar_type()), stack.b);
}

}  // namespace

torch::Tensor MixLoraImpl::forward(const torch::Tensor& x,
                                   const torch::Tensor& gate_up,
                                   const torch::Tensor& down) {
  const auto n_experts = moe_gate.size(0);
  auto logits = torch::nn::functional::linear(x.to(moe_gate.scalar_type()), moe_gate);  // [N, E]
  if (is_training()) {
    if (torch::GradMode::is_enabled() && pending_router_grad.defined()) {
      // Recomputing a checkpointed layer: the auxiliary loss's gradient enters here.
      backward_root = (torch::softmax(logits, -1) * pending_router_grad).sum();
      pending_router_grad = torch::Tensor();
    } else {
      router_logits = logits;
    }
  }
  auto [weights, chosen] = torch::softmax(logits, -1).topk(top_k, -1);  // [N, k] each
  weights = weights / weights.sum(-1, /*keepdim=*/true);
  if (per_expert_base) return forward_per_expert(x, gate_up, down, weights, chosen);

  // The experts' weighted sum in (at least) fp32, as MoE-PEFT's.
  const auto acc = c10::promoteTypes(x.scalar_type(), torch::kFloat32);
  const auto w = weights.to(acc);                               // [N, k]
  const auto pick = torch::one_hot(chosen, n_experts).to(acc);  // [N, k, E]
  const auto gu = torch::nn::functional::linear(x, gate_up);    // [N, 2I]: once for all slots
  auto delta = [&](const char* kind) {
    const auto it = experts.find(kind);
    if (it == experts.end()) return torch::Tensor();
    return expert_deltas(StackedExperts(it->second, x.scalar_type()), x.unsqueeze(1),
                         pick.to(x.scalar_type()));
  };
  const auto down_experts = experts.find("down_proj");
  const bool expert_down = down_experts != experts.end();
  // The slots' SwiGLU and their mix in one kernel on CUDA; the base down projection then runs
  // once on the mix, as it is linear.
  const auto mix = moe_swiglu(gu, delta("gate_proj"), delta("up_proj"), w, expert_down);
  auto y = torch::nn::functional::linear(mix.mixed, down);  // [N, C]
  if (expert_down) {
    const StackedExperts stack(down_experts->second, x.scalar_type());
    y = y + mixed_expert_delta(stack, mix.slots, pick * w.unsqueeze(-1));
  }
  return y;
}

torch::Tensor MixLoraImpl::forward_per_expert(const torch::Tensor& x,
                                              const torch::Tensor& gate_up,
                                              const torch::Tensor& down,
                                              const torch::Tensor& weights,
                                              const torch::Tensor& chosen) {
  const auto acc = c10::promoteTypes(x.scalar_type(), torch::kFloat32);
  auto out = torch::zeros({x.size(0), x.size(1)}, x.options().dtype(acc));
  auto lora_of = [&](const std::string& kind, int64_t e) -> const Lora* {
    const auto it = experts.find(kind);
    return it == experts.end() ? nullptr : &it->second[e];
  };
  for (int64_t e = 0; e < moe_gate.size(0); ++e) {
    const auto hit = chosen.eq(e);                     // [N, k]
    const auto rows = hit.any(-1).nonzero().view(-1);  // [n]
    if (rows.numel() == 0) continue;
    const auto w = (weights * hit).sum(-1).index_select(0, rows).unsqueeze(1);  // [n, 1]
    const auto xe = x.index_select(0, rows);                                    // [n, C]
    const auto gu = torch::nn::functional::linear(xe, gate_up);                 // [n, 2I]
    const auto g = with_lora(xe, gu.narrow(-1, 0, intermediate), lora_of("gate_proj", e));
    const auto u = with_lora(xe, gu.narrow(-1, intermediate, intermediate), lora_of("up_proj", e));
    const auto a = torch::silu(g) * u;  // [n, I]
    const auto y = with_lora(a, torch::nn::functional::linear(a, down), lora_of("down_proj", e));
    out.index_add_(0, rows, y.to(acc) * w.to(acc));
  }
  return out.to(x.scalar_type());
}

torch::Tensor MixLoraImpl::take_backward_root() {
  auto root = backward_root;
  backward_root = torch::Tensor();
  return root;
}

namespace {

// What the load-balancing loss is made of, over the concatenated router logits of L layers.
struct RoutingStats {
  torch::Tensor probs;   // [L*N, E] softmax of the logits
  torch::Tensor weight;  // [L*N] 1 for counted tokens, 0 for padding
  torch::Tensor f;       // [k, E] share of counted tokens whose j-th choice is e
};

RoutingStats routing_stats(const std::vector<torch::Tensor>& router_logits,
                           const torch::Tensor& keep,
                           int64_t top_k) {
  const auto z = torch::cat(router_logits, 0);  // [L*N, E]
  RoutingStats st;
  st.probs = torch::softmax(z, -1);
  const auto chosen = std::get<1>(st.probs.topk(top_k, -1));                   // [L*N, k]
  const auto one_hot = torch::one_hot(chosen, z.size(1)).to(z.scalar_type());  // [L*N, k, E]
  st.weight = keep.defined()
                  ? keep.to(z.scalar_type()).repeat({static_cast<int64_t>(router_logits.size())})
                  : torch::ones({z.size(0)}, z.options());
  st.f = (one_hot * st.weight.view({-1, 1, 1})).sum(0) / st.weight.sum();
  return st;
}

torch::Tensor balance_loss(const RoutingStats& st, double coef) {
  const auto mean_p = (st.probs * st.weight.unsqueeze(1)).sum(0) / st.weight.sum();  // [E]
  return coef * static_cast<double>(st.probs.size(1)) * (st.f * mean_p.unsqueeze(0)).sum();
}

}  // namespace

torch::Tensor mixlora_aux_loss(const std::vector<torch::Tensor>& router_logits,
                               const torch::Tensor& keep,
                               int64_t top_k,
                               double coef) {
  return balance_loss(routing_stats(router_logits, keep, top_k), coef);
}

namespace {

const std::vector<std::string> kFfnKinds = {"gate_proj", "up_proj", "down_proj"};

bool is_ffn_kind(const std::string& kind) {
  return std::find(kFfnKinds.begin(), kFfnKinds.end(), kind) != kFfnKinds.end();
}

// "model.layers.3.mlp" -> "mixlora.layers.3.mlp": MoE-PEFT's prefix for the model's modules.
std::string saved_name(const std::string& module) {
  return "mixlora" + module.substr(module.find('.'));
}

MixLoraImpl* mixlora_of(const FfnSite& site) {
  auto adapter = site.adapter();
  return adapter ? dynamic_cast<MixLoraImpl*>(adapter.get()) : nullptr;
}

// Every tensor of the MixLoRA on `sites`, under MoE-PEFT's name, in one order for save and load.
void for_each_tensor(const AdapterSites& sites,
                     const std::function<void(const std::string&, torch::Tensor&)>& f) {
  for (const auto& p : sites.projections) {
    auto* lora = p->adapter ? p->adapter->as<LoraImpl>() : nullptr;
    if (!lora) continue;
    f(saved_name(p->name) + ".lora_A.weight", lora->lora_A);
    f(saved_name(p->name) + ".lora_B.weight", lora->lora_B);
  }
  for (const auto& site : sites.ffns) {
    auto* m = mixlora_of(site);
    if (!m) continue;
    const auto prefix = saved_name(site.name);
    f(prefix + ".moe_gate.weight", m->moe_gate);
    for (auto& [kind, list] : m->experts) {
      for (size_t e = 0; e < list.size(); ++e) {
        const auto name = prefix + "." + kind + ".experts." + std::to_string(e);
        f(name + ".lora_A.weight", list[e]->lora_A);
        f(name + ".lora_B.weight", list[e]->lora_B);
      }
    }
  }
}

struct Shape {
  int64_t experts, top_k, r;
  double alpha, dropout;
  bool rslora;
  std::vector<std::string> attention, ffn;  // targeted kinds
  int64_t expert_r;  // the experts' LoRA (MoE-PEFT's expert_lora), by default the same
  double expert_alpha, expert_dropout;
};

void attach(const Shape& s, const AdapterSites& sites) {
  const double scaling = lora_scaling(s.alpha, s.r, s.rslora);
  attach_to_kinds(sites.projections, s.attention, [&](const ProjectionImpl& p) {
    return Lora(p.in_features, p.out_features, s.r, scaling, s.dropout, torch::device(p.device()))
        .ptr();
  });
  const double expert_scaling = lora_scaling(s.expert_alpha, s.expert_r, s.rslora);
  for (const auto& site : sites.ffns) {
    site.attach(MixLora(site.hidden, site.intermediate, s.experts, s.top_k, s.ffn, s.expert_r,
                        expert_scaling, s.expert_dropout, torch::device(site.device))
                    .ptr());
  }
}

// The settings with the experts' LoRA resolved: expert_r 0, expert_alpha 0 and
// expert_dropout -1 mean adapter.r, alpha and dropout.
Shape shape_of(const AdapterSettings& settings) {
  const auto& o = settings.options;
  const auto expert_r = o.at("expert_r").get<int64_t>();
  const auto expert_alpha = o.at("expert_alpha").get<double>();
  const auto expert_dropout = o.at("expert_dropout").get<double>();
  Shape s{o.at("num_experts").get<int64_t>(),
          o.at("top_k").get<int64_t>(),
          settings.r,
          settings.alpha,
          settings.dropout,
          settings.use_rslora,
          {},
          {},
          expert_r > 0 ? expert_r : settings.r,
          expert_alpha > 0 ? expert_alpha : settings.alpha,
          expert_dropout >= 0 ? expert_dropout : settings.dropout};
  for (const auto& kind : settings.targets)
    (is_ffn_kind(kind) ? s.ffn : s.attention).push_back(kind);
  return s;
}

void check_settings(const AdapterSettings& settings, std::vector<std::string>& problems) {
  const auto& o = settings.options;
  if (o.at("router_aux_loss_coef").get<double>() < 0) {
    problems.push_back(
        "'adapter.router_aux_loss_coef' is required with adapter.type mixlora (hint: 0.01, "
        "MixLoRA's documented value; MoE-PEFT's code defaults to 0.001)");
  }
  const auto expert_dropout = o.at("expert_dropout").get<double>();
  if (expert_dropout != -1 && (expert_dropout < 0 || expert_dropout >= 1)) {
    problems.push_back("'adapter.expert_dropout' is " + std::to_string(expert_dropout) +
                       ", expected a probability in [0, 1) or -1 (adapter.dropout)");
  }
  const auto top_k = o.at("top_k").get<int64_t>(), experts = o.at("num_experts").get<int64_t>();
  if (top_k > experts) {
    problems.push_back("'adapter.top_k' is " + std::to_string(top_k) +
                       ", more than adapter.num_experts (" + std::to_string(experts) + ")");
  }
}

}  // namespace

void mixlora_attach_new(const AdapterSettings& settings, const AdapterSites& sites) {
  attach(shape_of(settings), sites);
}

SavedAdapter mixlora_save(const AdapterSettings& settings,
                          const AdapterSites& sites,
                          const std::string& base_model) {
  const auto s = shape_of(settings);
  SavedAdapter out;
  out.config = {
      {"peft_type", "MIXLORA"},
      {"routing_strategy", "mixlora"},
      {"num_experts", s.experts},
      {"top_k", s.top_k},
      {"router_aux_loss_coef", settings.options.at("router_aux_loss_coef").get<double>()},
      {"router_init_range", 0.02},
      {"jitter_noise", 0.0},
      {"r", settings.r},
      {"lora_alpha", config_number(settings.alpha)},
      {"lora_dropout", settings.dropout},
      {"use_rslora", settings.use_rslora},
      {"target_modules", settings.targets},
      {"act_fn", "silu"},  // the FFN's (lorafit's models are SwiGLU): the MixLoRA package needs it
      {"bias", "none"},
      {"task_type", "CAUSAL_LM"},
      {"base_model_name_or_path", base_model}};
  if (s.expert_r != s.r || s.expert_alpha != s.alpha || s.expert_dropout != s.dropout) {
    out.config["expert_lora"] = {{"r", s.expert_r},
                                 {"lora_alpha", config_number(s.expert_alpha)},
                                 {"lora_dropout", s.expert_dropout}};
  }
  out.torch_bin_too = true;
  if (settings.dropout == 0 || s.expert_dropout == 0) {
    out.notes.push_back(
        "MoE-PEFT and the MixLoRA package will not load this adapter: they assert "
        "lora_dropout > 0 (hint: train with adapter.dropout above 0 to use it there)");
  }
  for_each_tensor(sites, [&](const std::string& name, torch::Tensor& t) {
    out.tensors[name] = t.detach().to(torch::kCPU, torch::kFloat32).contiguous();
  });
  return out;
}

void mixlora_attach_saved(const nlohmann::json& config,
                          const TensorMap& weights,
                          const AdapterSites& sites,
                          const std::string& where) {
  std::vector<std::string> problems;
  auto number = [&](const char* key) -> double {
    const auto it = config.find(key);
    if (it == config.end() || !it->is_number()) {
      problems.push_back("'" + std::string(key) + "' must be a number");
      return 1;
    }
    return it->get<double>();
  };
  const auto routing = config.value("routing_strategy", std::string());
  if (routing != "mixlora") {
    problems.push_back("'routing_strategy' is '" + routing +
                       "'; lorafit reads 'mixlora' (top-k) only");
  }
  Shape s{static_cast<int64_t>(number("num_experts")),
          static_cast<int64_t>(number("top_k")),
          static_cast<int64_t>(number("r")),
          number("lora_alpha"),
          0.0,
          config.value("use_rslora", false),
          {},
          {},
          0,
          0.0,
          0.0};
  s.expert_r = s.r, s.expert_alpha = s.alpha;
  if (const auto e = config.find("expert_lora"); e != config.end() && e->is_object()) {
    s.expert_r = e->value("r", s.r);
    s.expert_alpha = e->value("lora_alpha", s.alpha);
  }
  const auto targets = config.find("target_modules");
  if (targets == config.end() || !targets->is_array()) {
    problems.push_back("'target_modules' must be a list of module names");
  } else {
    for (const auto& t : *targets) {
      const auto kind = t.get<std::string>();
      (is_ffn_kind(kind) ? s.ffn : s.attention).push_back(kind);
    }
  }
  if (!problems.empty()) throw ConfigError("adapter '" + where + "': " + join_problems(problems));
  attach(s, sites);

  // Every tensor the attached modules hold must come from the file, with its shape.
  TensorBinding binding(weights);
  torch::NoGradGuard no_grad;
  for_each_tensor(sites, [&](const std::string& name, torch::Tensor& dst) {
    if (binding.expect(name, dst.sizes())) dst.copy_(weights.at(name));
  });
  binding.report_unexpected("belongs to no module");
  binding.check("adapter '" + where + "' does not fit this model",
                "it was trained for another model or is damaged");
}

torch::Tensor mixlora_aux_loss(const AdapterSettings& settings,
                               const AdapterSites& sites,
                               const torch::Tensor& keep,
                               double scale) {
  std::vector<torch::Tensor> logits;
  std::vector<MixLoraImpl*> blocks;
  for (const auto& site : sites.ffns) {
    auto* m = mixlora_of(site);
    if (m && m->router_logits.defined()) {
      logits.push_back(m->router_logits);
      blocks.push_back(m);
    }
  }
  if (logits.empty()) return {};
  const auto coef = settings.options.at("router_aux_loss_coef").get<double>();
  const auto st = routing_stats(logits, keep, settings.options.at("top_k").get<int64_t>());
  const auto loss = balance_loss(st, coef);
  if (!loss.requires_grad() && torch::GradMode::is_enabled()) {
    // The forward kept no graph (checkpointed layers). The loss is linear in the routing
    // probabilities once the top-k shares f are fixed: d/dp[l,t,e] = coef * E * sum_j f[j,e]
    // * w_t / sum(w), handed to each layer's recomputation.
    const auto n_experts = st.probs.size(1);
    const auto share = st.f.sum(0);  // [E]
    const auto n = logits[0].size(0);
    for (size_t l = 0; l < blocks.size(); ++l) {
      blocks[l]->pending_router_grad =
          (coef * static_cast<double>(n_experts) * scale) * share.unsqueeze(0) *
          st.weight.narrow(0, static_cast<int64_t>(l) * n, n).unsqueeze(1) / st.weight.sum();
    }
  }
  return loss * scale;
}

nlohmann::json mixlora_step_metrics(const AdapterSettings& settings, const AdapterSites& sites) {
  auto load = nlohmann::json::array();
  for (const auto& site : sites.ffns) {
    const auto* m = mixlora_of(site);
    if (!m || !m->router_logits.defined()) continue;
    const auto z = m->router_logits.detach();  // [N, E]
    const auto chosen = std::get<1>(z.topk(m->top_k, -1));
    const torch::Tensor share = torch::one_hot(chosen, z.size(1))
                                    .sum(std::vector<int64_t>{0, 1})
                                    .to(torch::kFloat64)
                                    .cpu() /
                                static_cast<double>(chosen.numel());  // [E]
    const double* first = share.data_ptr<double>();
    std::vector<double> row(first, first + share.numel());
    for (auto& x : row) x = std::round(x * 1e4) / 1e4;
    load.push_back(row);
  }
  return {{"expert_load", load}};
}

AdapterSpec mixlora_strategy() {
  AdapterSpec spec;
  spec.name = "mixlora";
  spec.peft_type = "MIXLORA";
  spec.summary = "top-k mixture of LoRA experts on the frozen MLP, LoRA on attention (MixLoRA)";
  StrategyKey routing{"routing_strategy", "mixlora"};
  routing.one_of = {"mixlora"};  // MoE-PEFT's top-k routing
  StrategyKey experts{"num_experts", 8}, top_k{"top_k", 2};
  experts.min = top_k.min = 1;
  // Required: MoE-PEFT's code defaults to 0.001 and its documentation to 0.01.
  StrategyKey coef{"router_aux_loss_coef", -1.0};
  // The experts' LoRA where it differs from r, alpha, dropout (0, 0, -1: the same).
  StrategyKey expert_r{"expert_r", 0}, expert_alpha{"expert_alpha", 0.0},
      expert_dropout{"expert_dropout", -1.0};
  expert_r.min = expert_alpha.min = 0;
  expert_r.only_when_set = expert_alpha.only_when_set = expert_dropout.only_when_set = true;
  spec.keys = {routing, experts, top_k, coef, expert_r, expert_alpha, expert_dropout};
  spec.reads = [](const nlohmann::json& config) {
    return config.value("peft_type", "") == "MIXLORA";
  };
  spec.check = check_settings;
  spec.attach_saved = mixlora_attach_saved;
  spec.attach_new = mixlora_attach_new;
  spec.save = mixlora_save;
  spec.aux_loss = mixlora_aux_loss;
  spec.step_metrics = mixlora_step_metrics;
  spec.mergeable = false;
  spec.with_trainable_base = false;
  return spec;
}

}  // namespace lorafit
