#include "adapters/projection.h"

#include <algorithm>

namespace lorafit {

ProjectionImpl::ProjectionImpl(std::string name_,
                               int64_t in,
                               int64_t out,
                               const torch::TensorOptions& options,
                               torch::Tensor shared_weight)
    : name(std::move(name_)), in_features(in), out_features(out) {
  weight = register_parameter(
      "weight", shared_weight.defined() ? shared_weight : torch::empty({out, in}, options),
      /*requires_grad=*/false);
}

torch::Tensor ProjectionImpl::forward(const torch::Tensor& x) {
  auto base = torch::nn::functional::linear(x, weight);
  return adapter ? adapter->forward(x, base) : base;
}

void ProjectionImpl::attach(std::shared_ptr<ProjectionAdapterImpl> a) {
  adapter =
      adapter ? replace_module("adapter", std::move(a)) : register_module("adapter", std::move(a));
}

std::string projection_kind(const std::string& name) {
  const auto dot = name.rfind('.');
  return dot == std::string::npos ? name : name.substr(dot + 1);
}

torch::Tensor add_low_rank(const torch::Tensor& base,
                           const torch::Tensor& xa,
                           const torch::Tensor& b,
                           double scaling) {
  const auto out = base.size(-1);
  return torch::addmm(base.reshape({-1, out}), xa.reshape({-1, xa.size(-1)}),
                      b.to(base.scalar_type()).t(), /*beta=*/1, /*alpha=*/scaling)
      .view(base.sizes());
}

void attach_to_kinds(
    const Projections& projections,
    const std::vector<std::string>& kinds,
    const std::function<std::shared_ptr<ProjectionAdapterImpl>(const ProjectionImpl&)>& make) {
  for (auto p : projections) {  // holders by value: attach() is not const
    if (std::find(kinds.begin(), kinds.end(), projection_kind(p->name)) != kinds.end())
      p->attach(make(*p));
  }
}

}  // namespace lorafit
