#include "adapters/lora.h"

#include <algorithm>
#include <cmath>
#include <regex>
#include <set>

#include "adapters/peft_names.h"
#include "core/errors.h"

namespace lorafit {

using nlohmann::json;

bool peft_targets(const json& targets, const std::string& name) {
  if (targets.is_string()) {
    const auto& s = targets.get_ref<const std::string&>();
    if (s == "all-linear") return name != "lm_head";
    try {
      return std::regex_match(name, std::regex(s));
    } catch (const std::regex_error&) {
      throw ConfigError("'target_modules' is '" + s + "', which is not a regular expression");
    }
  }
  for (const auto& t : targets) {
    const auto& s = t.get_ref<const std::string&>();
    if (name == s || (name.size() > s.size() &&
                      name.compare(name.size() - s.size() - 1, s.size() + 1, "." + s) == 0)) {
      return true;
    }
  }
  return false;
}

namespace {

// rank_pattern / alpha_pattern: the first key k for which `(.*\.)?(k)$` matches the module
// name (PEFT's get_pattern_key).
const json* pattern_value(const json& config, const char* key, const std::string& name) {
  auto it = config.find(key);
  if (it == config.end() || !it->is_object()) return nullptr;
  for (const auto& [k, v] : it->items()) {
    try {
      if (std::regex_match(name, std::regex("(.*\\.)?(" + k + ")"))) return &v;
    } catch (const std::regex_error&) {
      throw ConfigError("'" + std::string(key) + "' key '" + k + "' is not a regular expression");
    }
  }
  return nullptr;
}

}  // namespace

LoraImpl::LoraImpl(int64_t in,
                   int64_t out,
                   int64_t r,
                   double scaling_,
                   double dropout_,
                   const torch::TensorOptions& options)
    : scaling(scaling_), dropout(dropout_) {
  const auto o = options.dtype(torch::kFloat32);
  lora_A = register_parameter("lora_A", torch::empty({r, in}, o));
  lora_B = register_parameter("lora_B", torch::zeros({out, r}, o));
  // PEFT's default: A like nn.Linear (kaiming_uniform, a = sqrt(5)), B = 0.
  torch::NoGradGuard no_grad;
  torch::nn::init::kaiming_uniform_(lora_A, std::sqrt(5.0));
}

std::optional<LowRank> LoraImpl::low_rank() const {
  return LowRank{{{lora_A, lora_B, scaling}}, dropout};
}

torch::Tensor LoraImpl::merged_delta() const {
  return torch::matmul(lora_B.detach(), lora_A.detach()) * scaling;
}

double lora_scaling(double alpha, int64_t r, bool rslora) {
  return rslora ? alpha / std::sqrt(static_cast<double>(r)) : alpha / static_cast<double>(r);
}

void lora_attach_new(const AdapterSettings& s, const Projections& projections) {
  attach_to_kinds(projections, s.targets, [&](const ProjectionImpl& p) {
    return Lora(p.in_features, p.out_features, s.r, lora_scaling(s.alpha, s.r, s.use_rslora),
                s.dropout, torch::device(p.device()))
        .ptr();
  });
}

json peft_lora_config(const AdapterSettings& s,
                      const std::vector<std::string>& target_kinds,
                      const std::string& base_model) {
  return {
      {"alpha_pattern", json::object()},
      {"base_model_name_or_path", base_model},
      {"bias", "none"},
      {"fan_in_fan_out", false},
      {"inference_mode", true},
      {"init_lora_weights", true},
      {"lora_alpha", config_number(s.alpha)},
      {"lora_dropout", s.dropout},
      {"modules_to_save", nullptr},
      {"peft_type", "LORA"},
      {"r", s.r},
      {"rank_pattern", json::object()},
      {"revision", nullptr},
      {"target_modules", target_kinds},
      {"task_type", "CAUSAL_LM"},
      {"use_dora", false},
      {"use_rslora", s.use_rslora},
  };
}

SavedAdapter lora_save(const AdapterSettings& s,
                       const Projections& projections,
                       const std::string& base_model) {
  SavedAdapter out;
  std::set<std::string> kinds;
  for (const auto& p : projections) {
    const auto* lora = p->adapter ? p->adapter->as<LoraImpl>() : nullptr;
    if (!lora) continue;
    kinds.insert(projection_kind(p->name));
    out.tensors[kPeftPrefix + p->name + ".lora_A.weight"] = lora->lora_A.detach();
    out.tensors[kPeftPrefix + p->name + ".lora_B.weight"] = lora->lora_B.detach();
  }
  out.config = peft_lora_config(s, {kinds.begin(), kinds.end()}, base_model);
  return out;
}

void attach_lora_format(const json& config,
                        const TensorMap& weights,
                        const Projections& projections,
                        const std::string& where,
                        bool use_dora,
                        const std::vector<std::string>& extra_suffixes,
                        const LoraFormatMake& make) {
  std::vector<std::string> problems;
  auto unsupported = [&](const char* key, const json& ok) {
    auto it = config.find(key);
    if (it != config.end() && !it->is_null() && *it != ok) {
      problems.push_back("'" + std::string(key) + "' is " + it->dump() +
                         ", which lorafit does not "
                         "support (expected " +
                         ok.dump() + ")");
    }
  };
  unsupported("use_dora", use_dora);
  unsupported("fan_in_fan_out", false);
  unsupported("bias", "none");
  unsupported("lora_bias", false);
  unsupported("layers_to_transform", nullptr);
  unsupported("modules_to_save", nullptr);

  const auto targets_it = config.find("target_modules");
  const bool targets_ok =
      targets_it != config.end() &&
      (targets_it->is_string() ||
       (targets_it->is_array() && std::all_of(targets_it->begin(), targets_it->end(),
                                              [](const json& t) { return t.is_string(); })));
  if (!targets_ok) problems.push_back("'target_modules' must be a string or a list of strings");
  const auto alpha_it = config.find("lora_alpha");
  if (alpha_it == config.end() || !alpha_it->is_number()) {
    problems.push_back("'lora_alpha' must be a number");
  }
  const auto dropout_it = config.find("lora_dropout");
  const bool dropout_ok =
      dropout_it == config.end() || dropout_it->is_null() ||
      (dropout_it->is_number() && dropout_it->get<double>() >= 0 && dropout_it->get<double>() < 1);
  if (!dropout_ok) problems.push_back("'lora_dropout' must be a number in [0, 1)");
  const double dropout = dropout_ok && dropout_it != config.end() && !dropout_it->is_null()
                             ? dropout_it->get<double>()
                             : 0.0;
  const auto rslora_it = config.find("use_rslora");
  if (rslora_it != config.end() && !rslora_it->is_boolean() && !rslora_it->is_null()) {
    problems.push_back("'use_rslora' must be true or false");
  }
  const bool rslora =
      rslora_it != config.end() && rslora_it->is_boolean() && rslora_it->get<bool>();
  const double default_alpha =
      alpha_it != config.end() && alpha_it->is_number() ? alpha_it->get<double>() : 0;
  if (!problems.empty()) throw ConfigError("adapter '" + where + "': " + join_problems(problems));

  TensorBinding binding(weights);
  bool selected = false;
  for (auto p : projections) {  // holders by value: attach() is not const
    if (!peft_targets(*targets_it, p->name)) continue;
    selected = true;
    std::vector<std::string> keys = {kPeftPrefix + p->name + ".lora_A.weight",
                                     kPeftPrefix + p->name + ".lora_B.weight"};
    for (const auto& suffix : extra_suffixes) keys.push_back(kPeftPrefix + p->name + suffix);
    std::vector<torch::Tensor> found;
    for (const auto& key : keys) {
      if (!binding.expect(key)) break;  // the rank is read from lora_A: shapes are checked below
      found.push_back(weights.at(key));
    }
    if (found.size() != keys.size()) continue;
    const auto &a = found[0], &b = found[1];
    const auto r = a.dim() == 2 ? a.size(0) : -1;
    if (r <= 0 || a.size(1) != p->in_features || b.dim() != 2 || b.size(0) != p->out_features ||
        b.size(1) != r) {
      binding.problem("tensors '" + keys[0] + "' " + shape_text(a.sizes()) + " and lora_B " +
                      shape_text(b.sizes()) + " do not fit the projection [" +
                      std::to_string(p->out_features) + ", " + std::to_string(p->in_features) +
                      "], expected [r, " + std::to_string(p->in_features) + "] and [" +
                      std::to_string(p->out_features) + ", r]");
      continue;
    }
    if (const json* pr = pattern_value(config, "rank_pattern", p->name);
        pr && (!pr->is_number_integer() || pr->get<int64_t>() != r)) {
      binding.problem("rank_pattern gives " + pr->dump() + " for '" + p->name +
                      "' but its tensors have rank " + std::to_string(r));
      continue;
    }
    double alpha = default_alpha;
    if (const json* pa = pattern_value(config, "alpha_pattern", p->name); pa && pa->is_number()) {
      alpha = pa->get<double>();
    }
    const SavedLoraFactors factors{a, b, lora_scaling(alpha, r, rslora), dropout};
    if (auto adapter = make(*p, factors, {found.begin() + 2, found.end()}, binding))
      p->attach(std::move(adapter));
  }
  binding.report_unexpected("matches no targeted projection of the model");
  if (!selected && binding.ok()) {
    binding.problem("target_modules " + targets_it->dump() + " select no projection of the model");
  }
  binding.check("adapter '" + where + "' does not fit the model",
                use_dora ? "was it trained on this base model? DoRA needs every "
                           "lora_magnitude_vector: m-LoRA writes none, and its DoRA cannot be "
                           "read faithfully"
                         : "was it trained on this base model?");
}

void load_factors(LoraImpl& lora, const SavedLoraFactors& factors) {
  torch::NoGradGuard no_grad;
  lora.lora_A.copy_(factors.a);
  lora.lora_B.copy_(factors.b);
}

void lora_attach_saved(const json& config,
                       const TensorMap& weights,
                       const Projections& projections,
                       const std::string& where) {
  attach_lora_format(config, weights, projections, where, /*use_dora=*/false, {},
                     [](const ProjectionImpl& p, const SavedLoraFactors& f,
                        const std::vector<torch::Tensor>&, TensorBinding&) {
                       auto lora = Lora(p.in_features, p.out_features, f.a.size(0), f.scaling,
                                        f.dropout, torch::device(p.device()));
                       load_factors(*lora, f);
                       return lora.ptr();
                     });
}

AdapterSpec lora_strategy() {
  AdapterSpec spec;
  spec.name = "lora";
  spec.peft_type = "LORA";
  spec.summary = "low-rank update B*A on each targeted projection (PEFT's LoRA)";
  spec.reads = [](const json& config) {
    return config.value("peft_type", "") == "LORA" && config.value("use_dora", json()) != true;
  };
  on_projections<lora_attach_saved, lora_attach_new, lora_save>(spec);
  spec.chains = true;
  return spec;
}

}  // namespace lorafit
