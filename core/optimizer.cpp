#include "core/optimizer.h"

#include <cmath>

#include "core/compat.h"
#include "core/errors.h"
#include "core/fused_ops.h"
#include "core/safetensors.h"

namespace lorafit {

namespace {

// AdamW's step as multi-tensor LibTorch ops, where adamw_kernel_step does not run (the CPU).
torch::Tensor foreach_step(const std::vector<torch::Tensor>& p,
                           const std::vector<torch::Tensor>& g,
                           const std::vector<torch::Tensor>& m,
                           const std::vector<torch::Tensor>& v,
                           const AdamWUpdate& u,
                           const std::function<torch::Tensor(torch::Tensor)>& sum_over_ranks) {
  torch::Tensor norm;
  if (u.max_grad_norm > 0) {
    norm = torch::stack(at::_foreach_norm(g, 2)).norm();
    if (sum_over_ranks) norm = sum_over_ranks(norm.square()).sqrt();
    // torch.nn.utils.clip_grad_norm_: scale by max / (norm + 1e-6) when that is below 1.
    compat::foreach_scale_(g, (u.max_grad_norm / (norm + 1e-6)).clamp_max(1.0));
  }
  if (u.weight_decay != 0) at::_foreach_mul_(p, 1 - u.lr * u.weight_decay);
  at::_foreach_mul_(m, u.beta1);
  at::_foreach_add_(m, g, 1 - u.beta1);
  at::_foreach_mul_(v, u.beta2);
  at::_foreach_addcmul_(v, g, g, 1 - u.beta2);
  auto denom = at::_foreach_sqrt(v);
  at::_foreach_div_(denom, std::sqrt(u.bias2));
  at::_foreach_add_(denom, u.eps);
  at::_foreach_addcdiv_(p, m, denom, -u.lr / u.bias1);
  return norm;
}

}  // namespace

AdamW::AdamW(std::vector<torch::Tensor> p, AdamWSettings s) : params(std::move(p)), settings(s) {
  torch::NoGradGuard no_grad;
  for (const auto& t : params) {
    exp_avg.push_back(torch::zeros_like(t, torch::MemoryFormat::Preserve));
    exp_avg_sq.push_back(torch::zeros_like(t, torch::MemoryFormat::Preserve));
  }
}

torch::Tensor AdamW::step(double lr,
                          double max_grad_norm,
                          const std::function<torch::Tensor(torch::Tensor)>& sum_over_ranks) {
  // Names the step's host time in `lorafit bench --profile` traces, where the GPU waits on it.
  RECORD_FUNCTION("lorafit::AdamW::step", std::vector<c10::IValue>());
  torch::NoGradGuard no_grad;
  // A tensor that took no part in the step (no gradient) keeps its weights and moments.
  std::vector<torch::Tensor> p, g, m, v;
  for (size_t i = 0; i < params.size(); ++i) {
    if (!params[i].grad().defined()) continue;
    p.push_back(params[i]);
    g.push_back(params[i].grad());
    m.push_back(exp_avg[i]);
    v.push_back(exp_avg_sq[i]);
  }
  ++steps;
  const auto& s = settings;
  const AdamWUpdate update{lr,
                           s.beta1,
                           s.beta2,
                           s.eps,
                           s.weight_decay,
                           1 - std::pow(s.beta1, static_cast<double>(steps)),
                           1 - std::pow(s.beta2, static_cast<double>(steps)),
                           g.empty() ? 0.0 : max_grad_norm};
  torch::Tensor norm;
  if (!adamw_kernel_step(p, g, m, v, update, sum_over_ranks, norm))
    norm = foreach_step(p, g, m, v, update, sum_over_ranks);
  for (auto& t : p) t.mutable_grad() = torch::Tensor();
  return norm;
}

namespace {

// The saved state, named: exp_avg.i and exp_avg_sq.i in parameter order.
std::vector<std::pair<std::string, torch::Tensor>> named_state(const AdamW& opt) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (size_t i = 0; i < opt.params.size(); ++i) {
    out.emplace_back("exp_avg." + std::to_string(i), opt.exp_avg[i]);
    out.emplace_back("exp_avg_sq." + std::to_string(i), opt.exp_avg_sq[i]);
  }
  return out;
}

}  // namespace

void AdamW::save(const std::string& path) const {
  TensorMap tensors;
  for (const auto& [name, t] : named_state(*this)) tensors[name] = t;
  save_safetensors(path, tensors,
                   {{"format", "lorafit-adamw"},
                    {"steps", std::to_string(steps)},
                    {"tensors", std::to_string(params.size())}});
}

void AdamW::load(const std::string& path) {
  SafetensorsFile file(path);
  const auto& meta = file.header().metadata;
  const auto count = meta.find("tensors");
  if (count == meta.end() || count->second != std::to_string(params.size())) {
    throw ModelMismatchError(
        "optimizer state '" + path + "' is for " +
        (count == meta.end() ? std::string("an unknown number of") : count->second) +
        " tensors, this run trains " + std::to_string(params.size()) +
        " (hint: resume with the recipe that wrote it)");
  }
  torch::NoGradGuard no_grad;
  for (auto& [name, dst] : named_state(*this)) {  // dst shares the moment's storage
    const auto src = file.tensor(name);
    if (src.sizes() != dst.sizes()) {
      throw ModelMismatchError("optimizer tensor '" + name + "' in '" + path +
                               "' does not have the shape of the parameter it belongs to " +
                               "(hint: resume with the recipe that wrote it)");
    }
    dst.copy_(src);
  }
  steps = std::stoll(meta.at("steps"));
}

MasterWeights::MasterWeights(std::vector<torch::Tensor> model_params)
    : model(std::move(model_params)) {
  torch::NoGradGuard no_grad;
  for (const auto& p : model)
    masters.push_back(p.detach().to(torch::kFloat32, false, true).requires_grad_(true));
}

void MasterWeights::take_grads() {
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < model.size(); ++i) {
    auto& g = model[i].mutable_grad();
    masters[i].mutable_grad() = g.defined() ? g.to(torch::kFloat32) : torch::Tensor();
    g.reset();
  }
}

void MasterWeights::publish() {
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < model.size(); ++i) model[i].copy_(masters[i]);
}

std::vector<torch::Tensor> gradient_tensors(const AdamW& optimizer,
                                            const std::optional<MasterWeights>& masters) {
  auto out = optimizer.params;
  if (masters)
    for (auto& t : out)
      for (size_t i = 0; i < masters->masters.size(); ++i)
        if (t.is_same(masters->masters[i])) t = masters->model[i];
  return out;
}

std::optional<MasterWeights> masters_for(std::vector<torch::Tensor>& params) {
  std::vector<torch::Tensor> low;
  for (const auto& p : params)
    if (p.scalar_type() != torch::kFloat32) low.push_back(p);
  if (low.empty()) return std::nullopt;
  MasterWeights masters(low);
  size_t next = 0;
  for (auto& p : params)
    if (p.scalar_type() != torch::kFloat32) p = masters.masters[next++];
  return masters;
}

int64_t warmup_steps(const TrainRecipe& t, int64_t total) {
  if (t.warmup_ratio > 0)
    return static_cast<int64_t>(std::ceil(t.warmup_ratio * static_cast<double>(total)));
  return t.warmup_steps;
}

double scheduled_lr(const TrainRecipe& t, int64_t step, int64_t total) {
  const int64_t warmup = warmup_steps(t, total);
  if (step < warmup) return t.lr * static_cast<double>(step) / std::max<int64_t>(1, warmup);
  const double span = static_cast<double>(std::max<int64_t>(1, total - warmup));
  const double progress = static_cast<double>(step - warmup) / span;
  if (t.schedule == "linear") return t.lr * std::max(0.0, static_cast<double>(total - step) / span);
  if (t.schedule == "cosine") return t.lr * std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * progress)));
  return t.lr;
}

}  // namespace lorafit
