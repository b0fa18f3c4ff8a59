#include "core/projection.h"

#include <algorithm>
#include <functional>
#include <map>
#include <mutex>
#include <numeric>
#include <tuple>

#include "core/compat.h"

namespace lorafit {

int64_t BaseWeight::rows() const {
  if (dense.defined()) return dense.size(0);
  int64_t n = 0;
  for (const auto& b : blocks) n += b.rows;
  return n;
}

int64_t BaseWeight::cols() const {
  return dense.defined() ? dense.size(1) : blocks.at(0).cols;
}

torch::Tensor BaseWeight::materialize(torch::ScalarType dtype) const {
  if (dense.defined()) return dense.to(dtype);
  auto w = torch::empty({rows(), cols()}, blocks.at(0).packed.options().dtype(dtype));
  int64_t row = 0;
  for (const auto& b : blocks) {
    nf4_dequantize_into(b, w.narrow(0, row, b.rows));
    row += b.rows;
  }
  return w;
}

ProjectionImpl::ProjectionImpl(std::string name_,
                               int64_t in,
                               int64_t out,
                               const torch::TensorOptions& options_,
                               torch::Tensor shared_weight,
                               torch::Tensor bias_,
                               bool quantized)
    : name(std::move(name_)), in_features(in), out_features(out), options(options_) {
  if (!quantized) {
    weight = register_parameter(
        "weight", shared_weight.defined() ? shared_weight : torch::empty({out, in}, options),
        /*requires_grad=*/false);
  }
  if (bias_.defined()) bias = register_parameter("bias", bias_, /*requires_grad=*/false);
}

void ProjectionImpl::quantize(const torch::Tensor& w) {
  TORCH_CHECK(!weight.defined(), name, ": a projection built dense cannot be quantized");
  TORCH_CHECK(w.size(0) == out_features && w.size(1) == in_features, name,
              ": the weight to quantize has the wrong shape");
  nf4 = nf4_quantize(w.to(device()));
}

BaseWeight ProjectionImpl::base() const {
  return weight.defined() ? BaseWeight(weight) : BaseWeight(std::vector<Nf4Weight>{nf4});
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

// Per NF4 block of a base weight, the tensors that travel through the autograd function.
constexpr size_t kNf4Parts = 4;

// W [out, in] in `dtype`: `weight` itself, or (weight [0]) the NF4 row blocks dequantized.
torch::Tensor weight_of(const torch::Tensor& weight,
                        at::TensorList nf4,
                        const std::vector<int64_t>& rows,
                        int64_t cols,
                        torch::ScalarType dtype) {
  if (rows.empty()) return weight;
  std::vector<Nf4Weight> blocks;
  for (size_t b = 0; b < rows.size(); ++b) {
    const auto* p = &nf4[kNf4Parts * b];
    blocks.push_back({p[0], p[1], p[2], p[3], rows[b], cols});
  }
  return BaseWeight(std::move(blocks)).materialize(dtype);
}

// The factors as the GEMMs read them (fp32 adapter parameters in bf16, a group's a's
// stacked, fused jobs' factors batched), made once per change of the parameters instead of in
// every forward: a step's micro-batches, a checkpointed layer's recomputation and evaluation
// all read one copy, which saves a launch or two per term and forward (the fused jobs' step is
// launch-bound). An entry holds while its sources are the same tensors at the same version:
// every in-place update bumps it (the optimizer's foreach steps, copies into a parameter), as
// autograd's own checks of saved tensors rely on. Entries whose sources nothing else holds
// any more are dropped.
class FactorCopies {
 public:
  using Build = std::function<torch::Tensor(const std::vector<torch::Tensor>&)>;

  // `layout` names what `build` makes of the parts, with the numbers it depends on in `extra`.
  torch::Tensor get(const std::vector<torch::Tensor>& parts,
                    torch::ScalarType dtype,
                    int layout,
                    const std::vector<double>& extra,
                    const Build& build) {
    // A part computed in this forward (MultiLoRA's scaled b) is new every time: not kept. In a
    // CUDA graph every copy is made anew: each replay follows an optimizer step.
    for (const auto& p : parts)
      if (!p.is_leaf()) return build(parts);
    if (compat::capturing(parts[0].device())) {
      const torch::NoGradGuard no_grad;
      return build(parts);
    }
    const std::lock_guard<std::mutex> lock(mutex_);
    const Key key{parts[0].unsafeGetTensorImpl(), parts.size(), dtype, layout};
    auto it = entries_.find(key);
    if (it != entries_.end() && holds(it->second, parts, extra)) return it->second.value;
    Entry e;
    for (const auto& p : parts) {
      e.sources.push_back(p);
      e.versions.push_back(p._version());
      e.data.push_back(p.data_ptr());
    }
    e.extra = extra;
    {
      const torch::NoGradGuard no_grad;
      e.value = build(parts);
    }
    auto value = e.value;
    entries_[key] = std::move(e);
    if (entries_.size() > 2 * live_) sweep();
    return value;
  }

 private:
  using Key = std::tuple<const void*, size_t, torch::ScalarType, int>;
  struct Entry {
    std::vector<torch::Tensor> sources;
    std::vector<int64_t> versions;
    std::vector<const void*> data;  // set_data() swaps the memory and keeps the version
    std::vector<double> extra;
    torch::Tensor value;
  };

  static bool holds(const Entry& e,
                    const std::vector<torch::Tensor>& parts,
                    const std::vector<double>& extra) {
    if (e.sources.size() != parts.size() || e.extra != extra) return false;
    for (size_t i = 0; i < parts.size(); ++i)
      if (!e.sources[i].is_same(parts[i]) || e.versions[i] != parts[i]._version() ||
          e.data[i] != parts[i].data_ptr())
        return false;
    return true;
  }

  void sweep() {
    for (auto it = entries_.begin(); it != entries_.end();) {
      bool orphan = false;
      for (const auto& s : it->second.sources) orphan = orphan || s.use_count() == 1;
      it = orphan ? entries_.erase(it) : std::next(it);
    }
    live_ = std::max<size_t>(entries_.size(), 64);
  }

  std::mutex mutex_;  // a checkpointed layer recomputes on autograd's device thread
  std::map<Key, Entry> entries_;
  size_t live_ = 64;
};

FactorCopies& factor_copies() {
  static FactorCopies copies;
  return copies;
}

enum Layout { kStacked, kBatchedA, kBatchedB };

// parts: [k_t, ...] each -> [sum of k_t, ...] in `dtype`
torch::Tensor factor_copy(const std::vector<torch::Tensor>& parts, torch::ScalarType dtype) {
  if (parts.size() == 1 && parts[0].scalar_type() == dtype) return parts[0];
  return factor_copies().get(parts, dtype, kStacked, {}, [dtype](const auto& ps) {
    return (ps.size() == 1 ? ps[0] : torch::cat(ps, 0)).to(dtype);
  });
}

// Fused jobs whose groups are alike (each job's adapters on as many rows, the same terms on the
// same columns, any ranks): J groups of T terms that run as one batch of GEMMs, each rank
// padded with zeros to the largest of its term across the jobs, so that the launches per
// projection do not grow with the number of jobs.
struct GroupBatch {
  int64_t jobs = 0, rows = 0, row = 0;  // J groups of `rows` rows each from flattened row `row`
  std::vector<int64_t> cols, outs;      // per term index: first output column, width
  std::vector<int64_t> padded, offset;  // per term index: padded rank, first column in [Kp]
  std::vector<size_t> term;             // [J * T]: the term of job j's term index i
  int64_t ranks() const { return offset.back() + padded.back(); }  // Kp
  size_t per_job() const { return cols.size(); }                   // T
};

// The longest run of alike groups from groups[first] on, as one batch; none if it is shorter
// than two groups.
std::optional<GroupBatch> batch_from(const std::vector<TermGroup>& groups,
                                     size_t first,
                                     const std::vector<int64_t>& code,
                                     at::TensorList factors) {
  const auto& g0 = groups[first];
  // Group first + j fits: its terms on the next rows, each like g0's in columns, width and
  // dtypes, none with an output scale.
  const auto fits = [&](size_t j) {
    const auto& g = groups[first + j];
    if (g.count != g0.count || g.rows != g0.rows ||
        g.row != g0.row + static_cast<int64_t>(j) * g0.rows)
      return false;
    for (size_t i = 0; i < g.count; ++i) {
      const size_t t = g.first + i, t0 = g0.first + i;
      if (code[kCode * t + 3] >= 0 || code[kCode * t + 2] != code[kCode * t0 + 2] ||
          factors[2 * t + 1].size(0) != factors[2 * t0 + 1].size(0) ||
          factors[2 * t].scalar_type() != factors[2 * t0].scalar_type() ||
          factors[2 * t + 1].scalar_type() != factors[2 * t0 + 1].scalar_type())
        return false;
    }
    return true;
  };
  size_t n = 0;
  while (first + n < groups.size() && fits(n)) ++n;
  if (n < 2) return std::nullopt;
  GroupBatch b;
  b.jobs = static_cast<int64_t>(n), b.rows = g0.rows, b.row = g0.row;
  for (size_t i = 0; i < g0.count; ++i) {
    const size_t t0 = g0.first + i;
    b.cols.push_back(code[kCode * t0 + 2]), b.outs.push_back(factors[2 * t0 + 1].size(0));
    int64_t rank = 0;
    for (size_t j = 0; j < n; ++j)
      rank = std::max(rank, factors[2 * (groups[first + j].first + i)].size(0));
    b.padded.push_back(rank);
  }
  for (size_t j = 0; j < n; ++j)
    for (size_t i = 0; i < g0.count; ++i) b.term.push_back(groups[first + j].first + i);
  int64_t k = 0;
  for (const auto p : b.padded) b.offset.push_back(k), k += p;
  return b;
}

// What the GEMMs run as one: a batch of alike jobs' groups, or one group.
struct Unit {
  TermGroup group;  // the first group of a batch
  std::optional<GroupBatch> batch;
};

// The groups in order, each run of consecutive alike ones as one batch (the longest from
// where it starts), so that a job of another kind among them breaks only its own place.
std::vector<Unit> units_of(const std::vector<TermGroup>& groups,
                           const std::vector<int64_t>& code,
                           at::TensorList factors) {
  std::vector<Unit> out;
  for (size_t i = 0; i < groups.size();) {
    Unit u{groups[i], batch_from(groups, i, code, factors)};
    i += u.batch ? static_cast<size_t>(u.batch->jobs) : 1;
    out.push_back(std::move(u));
  }
  return out;
}

// The batch's a's as [J, Kp, in] in `dtype`, each job's term i at rows offset[i].., zero beyond
// its rank.
torch::Tensor batched_a(const GroupBatch& b, at::TensorList factors, torch::ScalarType dtype) {
  std::vector<torch::Tensor> parts;
  for (const auto t : b.term) parts.push_back(factors[2 * t]);
  const std::vector<double> extra(b.padded.begin(), b.padded.end());
  return factor_copies().get(parts, dtype, kBatchedA, extra, [&b, dtype](const auto& ps) {
    auto out = torch::zeros({b.jobs, b.ranks(), ps[0].size(1)}, ps[0].options().dtype(dtype));
    for (size_t n = 0; n < ps.size(); ++n) {
      const auto j = static_cast<int64_t>(n / b.per_job());
      const auto i = n % b.per_job();
      out[j].narrow(0, b.offset[i], ps[n].size(0)).copy_(ps[n]);
    }
    return out;
  });
}

// Term index i's b's, each scaled by its term's scaling, as [J, out_i, padded_i] in `dtype`.
torch::Tensor batched_b(const GroupBatch& b,
                        size_t i,
                        at::TensorList factors,
                        const std::vector<double>& scales,
                        torch::ScalarType dtype) {
  std::vector<torch::Tensor> parts;
  std::vector<double> extra{static_cast<double>(b.padded[i])};
  for (int64_t j = 0; j < b.jobs; ++j) {
    const auto t = b.term[j * b.per_job() + i];
    parts.push_back(factors[2 * t + 1]);
    extra.push_back(scales[t]);
  }
  return factor_copies().get(
      parts, dtype, kBatchedB, extra, [&b, i, &extra, dtype](const auto& ps) {
        auto out = torch::zeros({b.jobs, b.outs[i], b.padded[i]}, ps[0].options().dtype(dtype));
        for (int64_t j = 0; j < b.jobs; ++j)
          out[j].narrow(1, 0, ps[j].size(1)).copy_(ps[j] * extra[j + 1]);
        return out;
      });
}

// Term index i's scalings per job, [J, 1, 1] in `dtype` on `device`, made once: a copy from
// the host in every step would wait for the stream.
torch::Tensor batch_scales(const GroupBatch& b,
                           size_t i,
                           const std::vector<double>& scales,
                           const torch::TensorOptions& options) {
  std::vector<double> s;
  for (int64_t j = 0; j < b.jobs; ++j) s.push_back(scales[b.term[j * b.per_job() + i]]);
  static std::mutex mutex;
  static std::map<std::tuple<std::string, torch::ScalarType, std::vector<double>>, torch::Tensor>
      made;
  const std::lock_guard<std::mutex> lock(mutex);
  auto& t = made[{options.device().str(), options.dtype().toScalarType(), s}];
  if (!t.defined()) t = torch::tensor(s, torch::kFloat64).to(options).view({-1, 1, 1});
  return t;
}

// How the forward writes the update first and lets the base GEMM add onto it (beta 1): which
// terms write their columns (beta 0) rather than add to them, and the column runs (first,
// width) that no term covers, which are zeroed. It needs terms on every row, each term's
// columns another's exactly or no other's. A low-rank add after the base GEMM reads and writes
// its columns once more (cuBLAS runs such shallow adds at 0.7-2.6 TB/s on an H200, where a
// copy moves 4), while the compute-bound base GEMM reads them in its epilogue almost for free
// (docs/perf-notes.md, entry 12).
struct UpdateFirst {
  std::vector<bool> writes;                         // per term
  std::vector<std::pair<int64_t, int64_t>> zeroed;  // column runs no term covers
};

std::optional<UpdateFirst> update_first(const std::vector<int64_t>& code,
                                        int64_t rows,
                                        int64_t out,
                                        at::TensorList factors) {
  const size_t terms = code.size() / kCode;
  if (terms == 0) return std::nullopt;
  UpdateFirst plan{std::vector<bool>(terms, true), {}};
  std::vector<std::pair<int64_t, int64_t>> covered;  // (first column, width) per term
  for (size_t t = 0; t < terms; ++t) {
    if (code[kCode * t] != 0 || code[kCode * t + 1] != rows) return std::nullopt;
    const int64_t c = code[kCode * t + 2], w = factors[2 * t + 1].size(0);
    for (const auto& [cu, wu] : covered) {
      if (cu == c && wu == w) {
        plan.writes[t] = false;
      } else if (c < cu + wu && cu < c + w) {
        return std::nullopt;
      }
    }
    covered.emplace_back(c, w);
  }
  std::sort(covered.begin(), covered.end());
  int64_t at = 0;
  for (const auto& [c, w] : covered) {
    if (c > at) plan.zeroed.emplace_back(at, c - at);
    at = std::max(at, c + w);
  }
  if (at < out) plan.zeroed.emplace_back(at, out - at);
  return plan;
}

struct LowRankLinear : torch::autograd::Function<LowRankLinear> {
  // factors: a_0, b_0, a_1, b_1, ... (a_t [k_t, in], b_t [out_t, k_t]), then the output scales
  // ([out_t]) of the terms that have one; any floating dtype.
  // weight: W [out, in], or [0] when W is the NF4 row blocks in `nf4` (packed, absmax,
  // absmax_scale, offset per block, the blocks' row counts in nf4_rows).
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx,
                               torch::Tensor x,  // [..., in]
                               torch::Tensor weight,
                               at::TensorList factors,
                               at::TensorList nf4,
                               std::vector<int64_t> nf4_rows,
                               bool value_needed,
                               std::vector<int64_t> code,
                               std::vector<double> scales) {
    const auto dtype = x.scalar_type();
    auto shape = x.sizes().vec();
    shape.back() = nf4_rows.empty() ? weight.size(0)
                                    : std::accumulate(nf4_rows.begin(), nf4_rows.end(), int64_t{0});
    const auto x2 = x.reshape({-1, x.size(-1)});  // [N, in]
    const size_t terms = code.size() / kCode;
    const bool scaled = factors.size() > 2 * terms;
    value_needed = value_needed || scaled;  // a scale's gradient reads the output
    const auto first = value_needed ? update_first(code, x2.size(0), shape.back(), factors)
                                    : std::optional<UpdateFirst>();
    torch::Tensor y = value_needed && !first
                          ? torch::mm(x2, weight_of(weight, nf4, nf4_rows, x2.size(1), dtype).t())
                          : torch::empty({x2.size(0), shape.back()}, x.options());
    // Saved: x, weight, the factors, then per unit (a group, or a batch of them) its stacked a
    // and xa and its terms' b, all in x's dtype, then (for a scale's gradient) y, then the NF4
    // parts.
    std::vector<torch::Tensor> saved{x2, weight};
    saved.insert(saved.end(), factors.begin(), factors.end());
    for (const auto& u : units_of(groups_of(code), code, factors)) {
      if (u.batch) {
        // A batch saves its a [J, Kp, in], xa [J, n, Kp] and per term index s b [J, out_i, p_i].
        const auto& jb = *u.batch;
        const auto a = batched_a(jb, factors, dtype);
        const auto xa =
            torch::bmm(x2.narrow(0, jb.row, jb.jobs * jb.rows).reshape({jb.jobs, jb.rows, -1}),
                       a.transpose(1, 2));
        saved.push_back(a);
        saved.push_back(xa);
        auto yb = y.narrow(0, jb.row, jb.jobs * jb.rows).view({jb.jobs, jb.rows, -1});
        for (size_t i = 0; i < jb.per_job(); ++i) {
          const auto b = batched_b(jb, i, factors, scales, dtype);
          if (value_needed) {
            yb.narrow(2, jb.cols[i], jb.outs[i])
                .baddbmm_(xa.narrow(2, jb.offset[i], jb.padded[i]), b.transpose(1, 2));
          }
          saved.push_back(b);
        }
        continue;
      }
      const auto& g = u.group;
      std::vector<torch::Tensor> as;  // [k_t, in]
      for (size_t t = g.first; t < g.first + g.count; ++t) as.push_back(factors[2 * t]);
      const auto a = factor_copy(as, dtype);                          // [K, in]
      const auto xa = torch::mm(x2.narrow(0, g.row, g.rows), a.t());  // [n, K]
      saved.push_back(a);
      saved.push_back(xa);
      int64_t k = 0;
      for (size_t t = g.first; t < g.first + g.count; ++t) {
        const auto b = factor_copy({factors[2 * t + 1]}, dtype);  // [out_t, k_t]
        if (value_needed) {
          y.narrow(0, g.row, g.rows)
              .narrow(1, code[kCode * t + 2], b.size(0))
              .addmm_(xa.narrow(1, k, b.size(1)), b.t(), first && first->writes[t] ? 0 : 1,
                      scales[t]);
        }
        saved.push_back(b);
        k += b.size(1);
      }
    }
    if (first) {
      for (const auto& [col, width] : first->zeroed) y.narrow(1, col, width).zero_();
      y.addmm_(x2, weight_of(weight, nf4, nf4_rows, x2.size(1), dtype).t());
    }
    for (size_t t = 0; t < terms; ++t) {
      if (code[kCode * t + 3] < 0) continue;
      const auto& g = factors[2 * terms + code[kCode * t + 3]];  // [out_t]
      region(y, code, t, g.size(0)).mul_(g.to(dtype));
    }
    if (scaled) saved.push_back(y);
    saved.insert(saved.end(), nf4.begin(), nf4.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["nf4_rows"] = nf4_rows;
    ctx->saved_data["code"] = code;
    ctx->saved_data["scales"] = scales;
    return y.view(shape);
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto nf4_rows = ctx->saved_data["nf4_rows"].toIntVector();
    const std::vector<torch::Tensor> nf4(saved.end() - kNf4Parts * nf4_rows.size(), saved.end());
    saved.resize(saved.size() - nf4.size());
    const auto& x2 = saved[0];
    const auto code = ctx->saved_data["code"].toIntVector();
    const auto scales = ctx->saved_data["scales"].toDoubleVector();
    const size_t terms = code.size() / kCode;
    size_t n_scales = 0;
    for (size_t t = 0; t < terms; ++t) n_scales += code[kCode * t + 3] >= 0;
    const int64_t out_features = grads[0].size(-1);
    auto dy = grads[0].reshape({-1, out_features});  // [N, out]
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
    size_t at = 2 + 2 * terms + n_scales;  // each group's stacked a, xa and its terms' b
    const std::vector<torch::Tensor> factors(saved.begin() + 2, saved.begin() + at);
    const auto units = units_of(groups_of(code), code, factors);
    // As in the forward, one group on every row writes its part of dx first and the base
    // GEMM adds onto it, instead of a low-rank add after the base GEMM.
    const bool dx_first = units.size() == 1 && !units[0].batch && units[0].group.rows == x2.size(0);
    if (ctx->needs_input_grad(0)) {
      dx = dx_first
               ? torch::empty({x2.size(0), x2.size(1)}, dy.options())
               : torch::mm(dy, weight_of(saved[1], nf4, nf4_rows, x2.size(1), dy.scalar_type()));
    }
    if (ctx->needs_input_grad(1)) dw = torch::mm(dy.t(), x2);
    for (const auto& u : units) {
      if (u.batch) {
        const auto& jb = *u.batch;
        const auto &a = saved[at], &xa = saved[at + 1];  // [J, Kp, in], [J, n, Kp]
        const int64_t jobs = jb.jobs, n = jb.rows;
        const size_t per = jb.per_job();
        const auto dyb = dy.narrow(0, jb.row, jobs * n).reshape({jobs, n, -1});  // [J, n, out]
        const auto rank = [&](int64_t j, size_t i) {
          return factors[2 * jb.term[j * per + i]].size(0);
        };
        std::vector<torch::Tensor> dxas;  // [J, n, padded_i]
        for (size_t i = 0; i < per; ++i) {
          const auto& b = saved[at + 2 + i];                       // [J, out_i, padded_i]
          const auto dyi = dyb.narrow(2, jb.cols[i], jb.outs[i]);  // [J, n, out_i]
          dxas.push_back(torch::bmm(dyi, b));
          bool any_b = false;
          for (int64_t j = 0; j < jobs; ++j)
            any_b = any_b || ctx->needs_input_grad(2 + 2 * jb.term[j * per + i] + 1);
          if (!any_b) continue;
          // d b = s dy^T xa for every job in one GEMM, the scalings applied in the cast.
          const auto& b0 = factors[2 * jb.term[i] + 1];
          const auto db =
              (torch::bmm(dyi.transpose(1, 2), xa.narrow(2, jb.offset[i], jb.padded[i])) *
               batch_scales(jb, i, scales, b0.options()))
                  .to(b0.scalar_type());  // [J, out_i, padded_i]
          for (int64_t j = 0; j < jobs; ++j)
            dfactors[2 * jb.term[j * per + i] + 1] = db[j].narrow(1, 0, rank(j, i));
        }
        const auto dxa = dxas.size() == 1 ? dxas[0] : torch::cat(dxas, 2);  // [J, n, Kp], scaled
        if (dx.defined()) dx.narrow(0, jb.row, jobs * n).view({jobs, n, -1}).baddbmm_(dxa, a);
        bool any_a = false;
        for (const auto t : jb.term) any_a = any_a || ctx->needs_input_grad(2 + 2 * t);
        if (any_a) {
          const auto xb = x2.narrow(0, jb.row, jobs * n).reshape({jobs, n, -1});  // [J, n, in]
          const auto da =
              torch::bmm(dxa.transpose(1, 2), xb).to(factors[2 * jb.term[0]].scalar_type());
          for (int64_t j = 0; j < jobs; ++j)
            for (size_t i = 0; i < per; ++i)
              dfactors[2 * jb.term[j * per + i]] = da[j].narrow(0, jb.offset[i], rank(j, i));
        }
        at += 2 + per;
        continue;
      }
      const auto& g = u.group;
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
      // dxa^T, each term's rows written in place by its GEMM (contiguous, no concatenation).
      auto dxa_t = torch::empty({a.size(0), g.rows}, dy.options());  // [K, n]
      int64_t k = 0;
      for (size_t t = g.first; t < g.first + g.count; ++t) {
        const auto& b = saved[b_at + (t - g.first)];  // [out_t, k_t]
        const auto dyt = dys.narrow(1, code[kCode * t + 2], b.size(0));
        auto rows = dxa_t.narrow(0, k, b.size(1));  // [k_t, n]
        at::mm_out(rows, b.t(), dyt.t());
        if (!shared) rows.mul_(scales[t]);
        const auto& b_in = saved[2 + 2 * t + 1];
        if (ctx->needs_input_grad(2 + 2 * t + 1)) {
          dfactors[2 * t + 1] = torch::empty_like(b)
                                    .addmm_(dyt.t(), xa.narrow(1, k, b.size(1)), 0, scales[t])
                                    .to(b_in.scalar_type());
        }
        k += b.size(1);
      }
      if (dx.defined()) dx.narrow(0, g.row, g.rows).addmm_(dxa_t.t(), a, dx_first ? 0 : 1, s);
      bool any_a = false;
      for (size_t t = g.first; t < g.first + g.count; ++t)
        any_a = any_a || ctx->needs_input_grad(2 + 2 * t);
      if (!any_a) continue;
      // One cast for the group; each term's gradient is its rows of it (contiguous views,
      // which gradient accumulation takes as they are).
      const auto& a0 = saved[2 + 2 * g.first];
      const auto da = torch::empty_like(a).addmm_(dxa_t, xs, 0, s).to(a0.scalar_type());  // [K, in]
      k = 0;
      for (size_t t = g.first; t < g.first + g.count; ++t) {
        const auto& a_t = saved[2 + 2 * t];
        if (ctx->needs_input_grad(2 + 2 * t))
          dfactors[2 * t] = da.narrow(0, k, a_t.size(0)).to(a_t.scalar_type());
        k += a_t.size(0);
      }
    }
    if (dx.defined() && dx_first)
      dx.addmm_(dy, weight_of(saved[1], nf4, nf4_rows, x2.size(1), dy.scalar_type()));
    if (dx.defined()) {
      auto shape = grads[0].sizes().vec();
      shape.back() = x2.size(1);
      dx = dx.view(shape);
    }
    torch::autograd::tensor_list out{dx, dw};
    out.insert(out.end(), dfactors.begin(), dfactors.end());
    out.resize(out.size() + nf4.size() + 4);  // the NF4 parts, nf4_rows, value_needed, code, scales
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
                              const BaseWeight& weight,
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
  std::vector<torch::Tensor> nf4;
  std::vector<int64_t> rows;
  for (const auto& b : weight.blocks) {
    nf4.insert(nf4.end(), {b.packed, b.absmax, b.absmax_scale, b.offset});
    rows.push_back(b.rows);
  }
  // LibTorch 1.13's Function::apply takes no undefined tensor.
  const auto dense = weight.dense.defined() ? weight.dense : torch::empty({0}, x.options());
  return LowRankLinear::apply(x, dense, at::TensorList(factors), at::TensorList(nf4),
                              std::move(rows), value_needed, std::move(code), std::move(scales));
}

torch::Tensor adapted_output(ProjectionAdapterImpl& adapter,
                             const torch::Tensor& x,
                             const torch::Tensor& base) {
  const auto f = adapter.low_rank();
  return f ? with_terms(x, base, *f, adapter.is_training()) : adapter.forward(x, base);
}

namespace {

// The merged links of a quantized base, as frozen terms of its update.
LowRank with_merged(const ProjectionImpl& p, LowRank u) {
  if (p.merged.a.defined()) u.terms.push_back(p.merged);
  return u;
}

// x W^T through the projection's adapter. x: [..., in] -> [..., out]
torch::Tensor unbiased_output(ProjectionImpl& p, const torch::Tensor& x, bool value_needed) {
  if (!p.adapter) return low_rank_linear(x, p.base(), with_merged(p, {}), value_needed);
  const auto f = p.adapter->low_rank();
  // Dropout reaches only the adapter's input: the fused path would need the mask in its
  // backward, so that one runs as plain autograd.
  if (!f) return p.adapter->forward(x, p.base_output(x));
  if (f->dropout > 0 && p.adapter->is_training()) return with_terms(x, p.base_output(x), *f, true);
  const bool trained = p.weight.defined() && p.weight.requires_grad();
  return low_rank_linear(x, p.base(), with_merged(p, *f), value_needed || trained);
}

}  // namespace

torch::Tensor ProjectionImpl::base_output(const torch::Tensor& x) const {
  if (weight.defined()) return torch::nn::functional::linear(x, weight);
  return low_rank_linear(x, base(), with_merged(*this, {}));
}

torch::Tensor ProjectionImpl::forward(const torch::Tensor& x, bool value_needed) {
  if (!adapter && weight.defined() && (value_needed || weight.requires_grad()))
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
                            const torch::Tensor& bias,
                            bool value_needed) {
  LowRank update;
  BaseWeight base(weight);
  bool grouped = !weight.defined() || !weight.requires_grad();
  int64_t row = 0;
  for (auto* p : group) {
    if (weight.defined()) {
      const auto at = static_cast<const char*>(weight.data_ptr()) +
                      row * weight.stride(0) * weight.element_size();
      grouped = grouped && !p->weight.requires_grad() && p->weight.data_ptr() == at &&
                p->weight.strides() == weight.strides();
    } else {
      grouped = grouped && p->quantized();
      if (grouped) base.blocks.push_back(p->nf4);
    }
    if (!grouped) break;
    if (p->merged.a.defined()) {
      auto t = p->merged;
      t.col = row;
      update.terms.push_back(std::move(t));
    }
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
  if (!grouped || row != base.rows()) {
    std::vector<torch::Tensor> outs;
    for (auto* p : group) outs.push_back(p->forward(x, value_needed));
    return torch::cat(outs, -1);
  }
  if (update.terms.empty() && weight.defined() && value_needed)
    return torch::nn::functional::linear(x, weight, bias);
  // Terms on the same rows side by side (a job's, when jobs share the batch), so they share
  // one down-projection.
  std::stable_sort(update.terms.begin(), update.terms.end(), [](const auto& a, const auto& b) {
    return std::make_pair(a.row_begin, a.row_end) < std::make_pair(b.row_begin, b.row_end);
  });
  const auto y = low_rank_linear(x, base, update, value_needed);
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
