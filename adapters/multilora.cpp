#include "adapters/multilora.h"

#include <algorithm>
#include <cmath>
#include <set>

#include "adapters/lora.h"
#include "adapters/peft_names.h"
#include "core/errors.h"

namespace lorafit {

using nlohmann::json;

namespace {

std::string key(const std::string& module, const char* what, int64_t i, bool weight) {
  return kPeftPrefix + module + "." + what + "." + std::to_string(i) + (weight ? ".weight" : "");
}

}  // namespace

MultiLoraImpl::MultiLoraImpl(int64_t in,
                             int64_t out,
                             int64_t r,
                             int64_t n,
                             double scaling_,
                             double dropout_,
                             bool vector_scale,
                             const torch::TensorOptions& options)
    : scaling(scaling_), dropout(dropout_) {
  const auto o = options.dtype(torch::kFloat32);
  lora_A = register_parameter("lora_A", torch::empty({n, r, in}, o));
  lora_B = register_parameter("lora_B", torch::empty({n, out, r}, o));
  scale = register_parameter("scale", torch::zeros({n, vector_scale ? out : 1}, o));
  torch::NoGradGuard no_grad;
  for (int64_t i = 0; i < n; ++i) {  // each module's A and B like nn.Linear's weight
    torch::nn::init::kaiming_uniform_(lora_A[i], std::sqrt(5.0));
    torch::nn::init::kaiming_uniform_(lora_B[i], std::sqrt(5.0));
  }
}

std::optional<LowRank> MultiLoraImpl::low_rank() const {
  const auto n = lora_A.size(0), r = lora_A.size(1), in = lora_A.size(2), out = lora_B.size(1);
  auto b = (scale.unsqueeze(-1) * lora_B).permute({1, 0, 2}).reshape({out, n * r});  // [out, n*r]
  return LowRank{{{lora_A.reshape({n * r, in}), b, scaling}}, dropout};
}

torch::Tensor MultiLoraImpl::merged_delta() const {
  const auto n = lora_A.size(0), r = lora_A.size(1), in = lora_A.size(2), out = lora_B.size(1);
  auto b =
      (scale.detach().unsqueeze(-1) * lora_B.detach()).permute({1, 0, 2}).reshape({out, n * r});
  return torch::matmul(b, lora_A.detach().reshape({n * r, in})) * scaling;
}

void multilora_attach_new(const AdapterSettings& s, const Projections& projections) {
  const auto n = s.options.at("n").get<int64_t>();
  const bool vector_scale = s.options.at("scale") == "vector";
  attach_to_kinds(projections, s.targets, [&](const ProjectionImpl& p) {
    return MultiLora(p.in_features, p.out_features, s.r, n,
                     lora_scaling(s.alpha, s.r, s.use_rslora), s.dropout, vector_scale,
                     torch::device(p.device()))
        .ptr();
  });
}

SavedAdapter multilora_save(const AdapterSettings& s,
                            const Projections& projections,
                            const std::string& base_model) {
  SavedAdapter out;
  std::set<std::string> kinds;
  for (const auto& p : projections) {
    const auto* m = p->adapter ? p->adapter->as<MultiLoraImpl>() : nullptr;
    if (!m) continue;
    kinds.insert(projection_kind(p->name));
    for (int64_t i = 0; i < m->lora_A.size(0); ++i) {
      out.tensors[key(p->name, "lora_A", i, true)] = m->lora_A[i].detach();
      out.tensors[key(p->name, "lora_B", i, true)] = m->lora_B[i].detach();
      out.tensors[key(p->name, "lora_scale", i, false)] = m->scale[i].detach();
    }
  }
  out.config = {{"peft_type", "MULTILORA"},
                {"task_type", "CAUSAL_LM"},
                {"base_model_name_or_path", base_model},
                {"r", s.r},
                {"lora_alpha", s.alpha},
                {"lora_dropout", s.dropout},
                {"use_rslora", s.use_rslora},
                {"n", s.options.at("n")},
                {"scale", s.options.at("scale")},
                {"target_modules", std::vector<std::string>(kinds.begin(), kinds.end())}};
  return out;
}

void multilora_attach_saved(const json& config,
                            const TensorMap& weights,
                            const Projections& projections,
                            const std::string& where) {
  std::vector<std::string> problems;
  auto number = [&](const char* k) -> double {
    auto it = config.find(k);
    if (it == config.end() || !it->is_number()) {
      problems.push_back("'" + std::string(k) + "' must be a number");
      return 0;
    }
    return it->get<double>();
  };
  const double r_cfg = number("r"), alpha = number("lora_alpha"), n_cfg = number("n");
  const double dropout = config.value("lora_dropout", 0.0);
  const bool rslora = config.value("use_rslora", false);
  const auto targets = config.find("target_modules");
  if (targets == config.end() || !targets->is_array())
    problems.push_back("'target_modules' must be a list");
  const auto scale = config.value("scale", std::string("vector"));
  if (scale != "vector" && scale != "scalar")
    problems.push_back("'scale' must be \"vector\" or \"scalar\"");
  if (!problems.empty()) throw ConfigError("adapter '" + where + "': " + join_problems(problems));
  const auto r = static_cast<int64_t>(r_cfg), n = static_cast<int64_t>(n_cfg);

  TensorBinding binding(weights);
  for (auto p : projections) {
    if (!peft_targets(*targets, p->name)) continue;
    auto m = MultiLora(p->in_features, p->out_features, r, n, lora_scaling(alpha, r, rslora),
                       dropout, scale == "vector", torch::device(p->device()));
    torch::NoGradGuard no_grad;
    for (int64_t i = 0; i < n; ++i) {
      const std::pair<std::string, torch::Tensor> parts[] = {
          {key(p->name, "lora_A", i, true), m->lora_A[i]},
          {key(p->name, "lora_B", i, true), m->lora_B[i]},
          {key(p->name, "lora_scale", i, false), m->scale[i]}};
      for (const auto& [name, dst] : parts) {
        if (binding.expect(name, dst.sizes())) dst.copy_(weights.at(name));
      }
    }
    p->attach(m.ptr());
  }
  binding.report_unexpected("matches no targeted projection of the model");
  binding.check("adapter '" + where + "' does not fit the model",
                "was it trained on this base model?");
}

AdapterSpec multilora_strategy() {
  AdapterSpec spec;
  spec.name = "multilora";
  spec.peft_type = "MULTILORA";
  spec.summary = "n parallel LoRA modules with learnable scales (MultiLoRA)";
  StrategyKey n{"n", 3};
  n.min = 1;
  StrategyKey scale{"scale", "vector"};
  scale.one_of = {"vector", "scalar"};
  spec.keys = {n, scale};
  spec.reads = [](const json& config) { return config.value("peft_type", "") == "MULTILORA"; };
  on_projections<multilora_attach_saved, multilora_attach_new, multilora_save>(spec);
  spec.chains = true;
  return spec;
}

}  // namespace lorafit
