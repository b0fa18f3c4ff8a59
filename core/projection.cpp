#include "core/projection.h"

#include <algorithm>

namespace lorafit {

ProjectionImpl::ProjectionImpl(std::string name_,
                               int64_t in,
                               int64_t out,
                               const torch::TensorOptions& options,
                               torch::Tensor shared_weight,
                               torch::Tensor bias_)
    : name(std::move(name_)), in_features(in), out_features(out) {
  weight = register_parameter(
      "weight", shared_weight.defined() ? shared_weight : torch::empty({out, in}, options),
      /*requires_grad=*/false);
  if (bias_.defined()) bias = register_parameter("bias", bias_, /*requires_grad=*/false);
}

torch::Tensor ProjectionAdapterImpl::forward(const torch::Tensor&, const torch::Tensor&) {
  throw std::logic_error(
      "an adapter strategy must describe low-rank factors or compute its own forward");
}

namespace {

// The terms as numbers for the autograd context: per term (kCode numbers) its first flattened
// row, its row count, its first column and which factor after the a's and b's is its output
// scale (-1: none); and per term its scaling.
constexpr size_t kCode = 4;

struct TermLayout {
  std::vector<int64_t> code;
  std::vector<double> scales;
};

TermLayout layout_of(const LowRank& u, int64_t n) {
  TermLayout l;
  const int64_t per = u.batch_rows > 0 ? n / u.batch_rows : n;
  int64_t out_scales = 0;
  for (const auto& t : u.terms) {
    const bool all = t.row_end == 0;
    l.code.insert(l.code.end(),
                  {all ? 0 : t.row_begin * per, all ? n : (t.row_end - t.row_begin) * per, t.col,
                   t.out_scale.defined() ? out_scales++ : -1});
    l.scales.push_back(t.scaling);
  }
  return l;
}

// Runs of consecutive terms on the same rows: they share the down-projection.
struct TermGroup {
  size_t first, count;
  int64_t row, rows;
};

std::vector<TermGroup> groups_of(const std::vector<int64_t>& code) {
  std::vector<TermGroup> out;
  for (size_t t = 0; t * kCode < code.size(); ++t) {
    const int64_t row = code[kCode * t], rows = code[kCode * t + 1];
    if (!out.empty() && out.back().row == row && out.back().rows == rows) {
      ++out.back().count;
    } else {
      out.push_back({t, 1, row, rows});
    }
  }
  return out;
}

// A term's region of the flattened output: its rows, its columns. y: [N, out]
torch::Tensor region(const torch::Tensor& y,
                     const std::vector<int64_t>& code,
                     size_t t,
                     int64_t w) {
  return y.narrow(0, code[kCode * t], code[kCode * t + 1]).narrow(1, code[kCode * t + 2], w);
}

struct LowRankLinear : torch::autograd::Function<LowRankLinear> {
  // factors: a_0, b_0, a_1, b_1, ... (a_t [k_t, in], b_t [out_t, k_t]), then the output scales
  // ([out_t]) of the terms that have one; any floating dtype.
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx,
                               torch::Tensor x,       // [..., in]
                               torch::Tensor weight,  // [out, in]
                               at::TensorList factors,
                               bool value_needed,
                               std::vector<int64_t> code,
                               std::vector<double> scales) {
    auto shape = x.sizes().vec();
    shape.back() = weight.size(0);
    const auto x2 = x.reshape({-1, x.size(-1)});  // [N, in]
    const auto dtype = x.scalar_type();
    const size_t terms = code.size() / kCode;
    const bool scaled = factors.size() > 2 * terms;
    value_needed = value_needed || scaled;  // a scale's gradient reads the output
    torch::Tensor y = value_needed ? torch::mm(x2, weight.t())
                                   : torch::empty({x2.size(0), weight.size(0)}, x.options());
    // Saved: x, weight, the factors, then per group its stacked a and xa and its terms' b,
    // all in x's dtype.
    std::vector<torch::Tensor> saved{x2, weight};
    saved.insert(saved.end(), factors.begin(), factors.end());
    for (const auto& g : groups_of(code)) {
      std::vector<torch::Tensor> as;  // [k_t, in] in x's dtype
      for (size_t t = g.first; t < g.first + g.count; ++t) as.push_back(factors[2 * t].to(dtype));
      const auto a = as.size() == 1 ? as[0] : torch::cat(as, 0);      // [K, in]
      const auto xa = torch::mm(x2.narrow(0, g.row, g.rows), a.t());  // [n, K]
      saved.push_back(a);
      saved.push_back(xa);
      int64_t k = 0;
      for (size_t t = g.first; t < g.first + g.count; ++t) {
        const auto b = factors[2 * t + 1].to(dtype);  // [out_t, k_t]
        if (value_needed) {
          y.narrow(0, g.row, g.rows)
              .narrow(1, code[kCode * t + 2], b.size(0))
              .addmm_(xa.narrow(1, k, b.size(1)), b.t(), 1, scales[t]);
        }
        saved.push_back(b);
        k += b.size(1);
      }
    }
    for (size_t t = 0; t < terms; ++t) {
      if (code[kCode * t + 3] < 0) continue;
      const auto& g = factors[2 * terms + code[kCode * t + 3]];  // [out_t]
      region(y, code, t, g.size(0)).mul_(g.to(dtype));
    }
    if (scaled) saved.push_back(y);
    ctx->save_for_backward(saved);
    ctx->saved_data["code"] = code;
    ctx->saved_data["scales"] = scales;
    return y.view(shape);
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x2 = saved[0], &weight = saved[1];
    const auto code = ctx->saved_data["code"].toIntVector();
    const auto scales = ctx->saved_data["scales"].toDoubleVector();
    const size_t terms = code.size() / kCode;
    size_t n_scales = 0;
    for (size_t t = 0; t < terms; ++t) n_scales += code[kCode * t + 3] >= 0;
    auto dy = grads[0].reshape({-1, weight.size(0)});  // [N, out]
    std::vector<torch::Tensor> dfactors(2 * terms + n_scales);
    if (n_scales > 0) {
      // d/d scale = sum over the region's rows of dy * y0, y0 = y / scale the unscaled
      // output (the product in dy's dtype, summed in fp32 or wider, as autograd's mul and
      // sum would); every gradient below then flows through dy * scale.
      const auto& y = saved.back();  // [N, out]
      const auto acc = torch::promote_types(dy.scalar_type(), torch::kFloat);
      // Scales on every row (no jobs) make one column vector and one pass over dy.
      auto columns = torch::ones({dy.size(1)}, dy.options());  // [out]
      bool every_row = true;
      for (size_t t = 0; t < terms; ++t) {
        const auto si = code[kCode * t + 3];
        if (si < 0) continue;
        const auto& g = saved[2 + 2 * terms + si];  // [out_t]
        const auto w = g.size(0);
        if (ctx->needs_input_grad(2 + 2 * terms + si)) {
          const auto dg = (region(dy, code, t, w) * region(y, code, t, w))
                              .sum(std::vector<int64_t>{0}, false, acc);
          const auto safe = torch::where(g == 0, torch::ones_like(g), g).to(acc);
          dfactors[2 * terms + si] = (dg / safe).to(g.scalar_type());
        }
        every_row = every_row && code[kCode * t] == 0 && code[kCode * t + 1] == dy.size(0);
        columns.narrow(0, code[kCode * t + 2], w).copy_(g);
      }
      if (every_row) {
        dy = dy * columns;
      } else {
        auto scaled_dy = dy.clone();
        for (size_t t = 0; t < terms; ++t) {
          const auto si = code[kCode * t + 3];
          if (si < 0) continue;
          const auto& g = saved[2 + 2 * terms + si];
          region(scaled_dy, code, t, g.size(0)).mul_(g.to(scaled_dy.scalar_type()));
        }
        dy = scaled_dy;
      }
    }
    torch::Tensor dx, dw;
    if (ctx->needs_input_grad(0)) dx = torch::mm(dy, weight);  // [N, in]
    if (ctx->needs_input_grad(1)) dw = torch::mm(dy.t(), x2);
    size_t at = 2 + 2 * terms + n_scales;  // each group's stacked a, xa and its terms' b
    for (const auto& g : groups_of(code)) {
      const auto &a = saved[at], &xa = saved[at + 1];
      const size_t b_at = at + 2;
      at += 2 + g.count;
      const auto dys = dy.narrow(0, g.row, g.rows);  // [n, out]
      const auto xs = x2.narrow(0, g.row, g.rows);   // [n, in]
      // A group whose terms share one scaling (a job's adapters) applies it in the GEMMs
      // below; otherwise each term's part of dxa is scaled on its own.
      bool shared = true;
      for (size_t t = g.first; t < g.first + g.count; ++t)
        shared = shared && scales[t] == scales[g.first];
      const double s = shared ? scales[g.first] : 1.0;
      std::vector<torch::Tensor> dxas;  // [n, k_t]
      int64_t k = 0;
      for (size_t t = g.first; t < g.first + g.count; ++t) {
        const auto& b = saved[b_at + (t - g.first)];  // [out_t, k_t]
        const auto dyt = dys.narrow(1, code[kCode * t + 2], b.size(0));
        dxas.push_back(shared ? torch::mm(dyt, b) : torch::mm(dyt, b).mul_(scales[t]));
        const auto& b_in = saved[2 + 2 * t + 1];
        if (ctx->needs_input_grad(2 + 2 * t + 1)) {
          dfactors[2 * t + 1] = torch::empty_like(b)
                                    .addmm_(dyt.t(), xa.narrow(1, k, b.size(1)), 0, scales[t])
                                    .to(b_in.scalar_type());
        }
        k += b.size(1);
      }
      const auto dxa = dxas.size() == 1 ? dxas[0] : torch::cat(dxas, 1);  // [n, K]
      if (dx.defined()) dx.narrow(0, g.row, g.rows).addmm_(dxa, a, 1, s);
      bool any_a = false;
      for (size_t t = g.first; t < g.first + g.count; ++t)
        any_a = any_a || ctx->needs_input_grad(2 + 2 * t);
      if (!any_a) continue;
      const auto da = torch::empty_like(a).addmm_(dxa.t(), xs, 0, s);  // [K, in]
      k = 0;
      for (size_t t = g.first; t < g.first + g.count; ++t) {
        const auto& a_t = saved[2 + 2 * t];
        if (ctx->needs_input_grad(2 + 2 * t))
          dfactors[2 * t] = da.narrow(0, k, a_t.size(0)).to(a_t.scalar_type());
        k += a_t.size(0);
      }
    }
    if (dx.defined()) {
      auto shape = grads[0].sizes().vec();
      shape.back() = weight.size(1);
      dx = dx.view(shape);
    }
    torch::autograd::tensor_list out{dx, dw};
    out.insert(out.end(), dfactors.begin(), dfactors.end());
    out.resize(out.size() + 3);  // value_needed, code, scales
    return out;
  }
};

// base + the terms of an adapter's own update (every row, every column) with dropout on
// their input: plain autograd. x: [..., in], base: [..., out]
torch::Tensor with_terms(const torch::Tensor& x,
                         const torch::Tensor& base,
                         const LowRank& u,
                         bool training) {
  const bool drop = u.dropout > 0 && training;
  const auto h = drop ? torch::dropout(x, u.dropout, /*train=*/true) : x;
  auto y = base;
  for (const auto& t : u.terms) {
    TORCH_CHECK(t.row_end == 0 && t.col == 0 && t.b.size(0) == base.size(-1),
                "an adapter's own update covers every row and column");
    TORCH_CHECK(!(drop && t.out_scale.defined()),
                "an adapter that scales its output computes its own dropout");
    y = y + torch::nn::functional::linear(torch::nn::functional::linear(h, t.a.to(x.scalar_type())),
                                          t.b.to(x.scalar_type())) *
                t.scaling;
    if (t.out_scale.defined()) y = y * t.out_scale.to(x.scalar_type());
  }
  return y;
}

}  // namespace

torch::Tensor low_rank_linear(const torch::Tensor& x,
                              const torch::Tensor& weight,
                              const LowRank& update,
                              bool value_needed) {
  auto [code, scales] = layout_of(update, x.numel() / x.size(-1));
  std::vector<torch::Tensor> factors;
  for (const auto& t : update.terms) {
    factors.push_back(t.a);
    factors.push_back(t.b);
  }
  for (const auto& t : update.terms)
    if (t.out_scale.defined()) factors.push_back(t.out_scale);
  return LowRankLinear::apply(x, weight, at::TensorList(factors), value_needed, std::move(code),
                              std::move(scales));
}

torch::Tensor adapted_output(ProjectionAdapterImpl& adapter,
                             const torch::Tensor& x,
                             const torch::Tensor& base) {
  const auto f = adapter.low_rank();
  return f ? with_terms(x, base, *f, adapter.is_training()) : adapter.forward(x, base);
}

namespace {

// x W^T through the projection's adapter. x: [..., in] -> [..., out]
torch::Tensor unbiased_output(ProjectionImpl& p, const torch::Tensor& x, bool value_needed) {
  if (!p.adapter) return low_rank_linear(x, p.weight, LowRank{}, false);
  const auto f = p.adapter->low_rank();
  // Dropout reaches only the adapter's input: the fused path would need the mask in its
  // backward, so that one runs as plain autograd.
  if (!f) return p.adapter->forward(x, torch::nn::functional::linear(x, p.weight));
  if (f->dropout > 0 && p.adapter->is_training())
    return with_terms(x, torch::nn::functional::linear(x, p.weight), *f, true);
  return low_rank_linear(x, p.weight, *f, value_needed || p.weight.requires_grad());
}

}  // namespace

torch::Tensor ProjectionImpl::forward(const torch::Tensor& x, bool value_needed) {
  if (!adapter && (value_needed || weight.requires_grad()))
    return torch::nn::functional::linear(x, weight, bias);
  const auto y = unbiased_output(*this, x, value_needed);
  return bias.defined() ? y + bias : y;
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
                            const std::vector<ProjectionImpl*>& group,
                            const torch::Tensor& bias) {
  LowRank update;
  bool grouped = !weight.requires_grad();
  int64_t row = 0;
  for (auto* p : group) {
    const auto at = static_cast<const char*>(weight.data_ptr()) +
                    row * weight.stride(0) * weight.element_size();
    grouped = grouped && !p->weight.requires_grad() && p->weight.data_ptr() == at &&
              p->weight.strides() == weight.strides();
    if (!grouped) break;
    if (p->adapter) {
      auto f = p->adapter->low_rank();
      grouped = f && !(f->dropout > 0 && p->adapter->is_training());
      if (!grouped) break;
      if (f->batch_rows > 0) update.batch_rows = f->batch_rows;
      for (auto t : f->terms) {
        t.col += row;
        update.terms.push_back(std::move(t));
      }
    }
    row += p->out_features;
  }
  if (!grouped || row != weight.size(0)) {
    std::vector<torch::Tensor> outs;
    for (auto* p : group) outs.push_back(p->forward(x));
    return torch::cat(outs, -1);
  }
  if (update.terms.empty()) return torch::nn::functional::linear(x, weight, bias);
  // Terms on the same rows side by side (a job's, when jobs share the batch), so they share
  // one down-projection.
  std::stable_sort(update.terms.begin(), update.terms.end(), [](const auto& a, const auto& b) {
    return std::make_pair(a.row_begin, a.row_end) < std::make_pair(b.row_begin, b.row_end);
  });
  const auto y = low_rank_linear(x, weight, update);
  return bias.defined() ? y + bias : y;
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
