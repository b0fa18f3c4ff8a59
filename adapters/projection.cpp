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

torch::Tensor ProjectionAdapterImpl::forward(const torch::Tensor&, const torch::Tensor&) {
  throw std::logic_error(
      "an adapter strategy must describe low-rank factors or compute its own forward");
}

namespace {

struct LowRankLinear : torch::autograd::Function<LowRankLinear> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx,
                               torch::Tensor x,       // [..., in]
                               torch::Tensor weight,  // [out, in]
                               torch::Tensor a,       // [k, in]
                               torch::Tensor b,       // [out, k]
                               double scaling,
                               bool value_needed) {
    auto shape = x.sizes().vec();
    shape.back() = weight.size(0);
    const auto x2 = x.reshape({-1, x.size(-1)});  // [N, in]
    const auto xa = torch::mm(x2, a.t());         // [N, k]
    torch::Tensor y;                              // [N, out]
    if (value_needed) {
      y = torch::mm(x2, weight.t());
      if (a.size(0) > 0) y.addmm_(xa, b.t(), /*beta=*/1, /*alpha=*/scaling);
    } else {
      y = torch::empty({x2.size(0), weight.size(0)}, x.options());
    }
    ctx->save_for_backward({x2, weight, a, b, xa});
    ctx->saved_data["scaling"] = scaling;
    return y.view(shape);
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x2 = saved[0], &weight = saved[1], &a = saved[2], &b = saved[3], &xa = saved[4];
    const double scaling = ctx->saved_data["scaling"].toDouble();
    const auto dy = grads[0].reshape({-1, weight.size(0)});  // [N, out]
    const auto dxa = torch::mm(dy, b * scaling);             // [N, k]
    torch::Tensor dx, dw, da, db;
    if (ctx->needs_input_grad(0)) {
      dx = torch::mm(dy, weight);  // [N, in]
      if (a.size(0) > 0) dx.addmm_(dxa, a);
      auto shape = grads[0].sizes().vec();
      shape.back() = weight.size(1);
      dx = dx.view(shape);
    }
    if (ctx->needs_input_grad(1)) dw = torch::mm(dy.t(), x2);
    if (ctx->needs_input_grad(2)) da = torch::mm(dxa.t(), x2);
    if (ctx->needs_input_grad(3)) db = torch::mm(dy.t(), xa) * scaling;
    return {dx, dw, da, db, torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor low_rank_linear(const torch::Tensor& x,
                              const torch::Tensor& weight,
                              const torch::Tensor& a,
                              const torch::Tensor& b,
                              double scaling,
                              bool value_needed) {
  return LowRankLinear::apply(x, weight, a, b, scaling, value_needed);
}

torch::Tensor ProjectionImpl::forward(const torch::Tensor& x, bool value_needed) {
  if (!adapter) {
    if (value_needed || weight.requires_grad()) return torch::nn::functional::linear(x, weight);
    return low_rank_linear(x, weight, torch::zeros({0, in_features}, x.options()),
                           torch::zeros({out_features, 0}, x.options()), 1.0, false);
  }
  const auto f = adapter->low_rank(x.scalar_type());
  if (!f) return adapter->forward(x, torch::nn::functional::linear(x, weight));
  if (f->dropout > 0 && adapter->is_training()) {
    // Dropout reaches only the adapter's input: the fused path would need the mask in its
    // backward, so this one runs as plain autograd.
    auto xa = torch::nn::functional::linear(torch::dropout(x, f->dropout, /*train=*/true), f->a);
    auto y = torch::nn::functional::linear(x, weight);
    return y.view({-1, y.size(-1)})
        .addmm_(xa.reshape({-1, xa.size(-1)}), f->b.t(), /*beta=*/1, /*alpha=*/f->scaling)
        .view(y.sizes());
  }
  return low_rank_linear(x, weight, f->a, f->b, f->scaling, value_needed || weight.requires_grad());
}

void ProjectionImpl::attach(std::shared_ptr<ProjectionAdapterImpl> a) {
  adapter =
      adapter ? replace_module("adapter", std::move(a)) : register_module("adapter", std::move(a));
}

std::string projection_kind(const std::string& name) {
  const auto dot = name.rfind('.');
  return dot == std::string::npos ? name : name.substr(dot + 1);
}

torch::Tensor project_group(const torch::Tensor& x,
                            const torch::Tensor& weight,
                            const std::vector<ProjectionImpl*>& group) {
  std::vector<torch::Tensor> as, bs;  // [k_i, in], [out_i, k_i]
  bool grouped = !weight.requires_grad();
  int64_t row = 0;
  for (auto* p : group) {
    const auto at = static_cast<const char*>(weight.data_ptr()) +
                    row * weight.stride(0) * weight.element_size();
    grouped = grouped && !p->weight.requires_grad() && p->weight.data_ptr() == at &&
              p->weight.strides() == weight.strides();
    row += p->out_features;
    if (!grouped) break;
    if (!p->adapter) {
      bs.push_back(torch::zeros({p->out_features, 0}, x.options()));
      continue;
    }
    const auto f = p->adapter->low_rank(x.scalar_type());
    grouped = f && !(f->dropout > 0 && p->adapter->is_training());
    if (!grouped) break;
    as.push_back(f->a);
    bs.push_back(f->b * f->scaling);
  }
  if (!grouped || row != weight.size(0)) {
    std::vector<torch::Tensor> outs;
    for (auto* p : group) outs.push_back(p->forward(x));
    return torch::cat(outs, -1);
  }
  if (as.empty()) return torch::nn::functional::linear(x, weight);
  return low_rank_linear(x, weight, torch::cat(as, 0), torch::block_diag(bs), 1.0);
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
