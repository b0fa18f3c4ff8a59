#include "core/fused_ops.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "core/nf4.h"

#ifdef LORAFIT_WITH_KERNELS
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "core/kernels.h"
#endif

namespace lorafit {

namespace composite {

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  // fp32 as transformers for bf16, f16 and f32; float64 stays float64 (tests).
  auto x32 = x.to(c10::promoteTypes(x.scalar_type(), torch::kFloat32));
  x32 = x32 * torch::rsqrt(x32.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return weight * x32.to(x.scalar_type());
}

torch::Tensor swiglu(const torch::Tensor& gate_up) {
  const auto i = gate_up.size(-1) / 2;
  return torch::silu(gate_up.narrow(-1, 0, i)) * gate_up.narrow(-1, i, i);
}

MoeSwiglu moe_swiglu(const torch::Tensor& gate_up,
                     const torch::Tensor& gate_delta,
                     const torch::Tensor& up_delta,
                     const torch::Tensor& weights,
                     bool keep_slots) {
  const auto n = gate_up.size(0), i = gate_up.size(1) / 2, k = weights.size(1);
  torch::Tensor a;  // [N, k, I]
  if (gate_delta.defined() || up_delta.defined()) {
    auto part = [&](int64_t first, const torch::Tensor& delta) {
      const auto base = gate_up.narrow(-1, first, i).unsqueeze(1);  // [N, 1, I]
      return delta.defined() ? base + delta : base.expand({n, k, i});
    };
    a = torch::silu(part(0, gate_delta)) * part(i, up_delta);
  } else {
    a = swiglu(gate_up).unsqueeze(1).expand({n, k, i});
  }
  const auto mixed = (a.to(weights.scalar_type()) * weights.unsqueeze(-1)).sum(1);
  return {mixed.to(gate_up.scalar_type()), keep_slots ? a : torch::Tensor()};
}

namespace {

// x: [B, H, T, D], cos, sin: [T, D] or, per row, [B, T, D]
torch::Tensor apply_rope(const torch::Tensor& x, torch::Tensor cos, torch::Tensor sin) {
  if (cos.dim() == 3) cos = cos.unsqueeze(1), sin = sin.unsqueeze(1);
  const auto half = x.size(-1) / 2;
  auto rotated = torch::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * cos + rotated * sin;
}

}  // namespace

QKV split_rope(const torch::Tensor& qkv,
               int64_t heads,
               int64_t kv_heads,
               const torch::Tensor& cos,
               const torch::Tensor& sin) {
  const auto b = qkv.size(0), t = qkv.size(1), d = cos.size(-1);
  auto part = [&](int64_t first_head, int64_t n) {  // [B, n, T, D]
    return qkv.narrow(-1, first_head * d, n * d).view({b, t, n, d}).transpose(1, 2);
  };
  return {apply_rope(part(0, heads), cos, sin), apply_rope(part(heads, kv_heads), cos, sin),
          part(heads + kv_heads, kv_heads)};
}

std::pair<torch::Tensor, torch::Tensor> target_log_softmax(torch::Tensor logits,
                                                           const torch::Tensor& targets,
                                                           bool grad) {
  // fp32 as transformers upcasts logits; float64 stays float64.
  auto l = logits.to(c10::promoteTypes(logits.scalar_type(), torch::kFloat32));  // [n, V]
  const auto keep = targets.ge(0).unsqueeze(1);                                  // [n, 1]
  const auto t = targets.clamp_min(0).unsqueeze(1);                              // [n, 1]
  auto lse = l.logsumexp(-1, /*keepdim=*/true);                                  // [n, 1]
  auto logp = (l.gather(1, t) - lse).masked_fill(keep.logical_not(), 0).squeeze(1);
  if (!grad) return {logp, torch::Tensor()};
  auto d = l.sub_(lse).exp_().neg_();
  d.scatter_add_(1, t, torch::ones_like(t, d.options()));
  return {logp, (d * keep).to(logits.scalar_type())};
}

}  // namespace composite

#ifdef LORAFIT_WITH_KERNELS

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

kernels::Dtype kernel_dtype(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32:
      return kernels::Dtype::f32;
    case torch::kFloat64:
      return kernels::Dtype::f64;
    case torch::kBFloat16:
      return kernels::Dtype::bf16;
    default:
      return kernels::Dtype::f16;
  }
}

kernels::Stream stream_of(const torch::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

void* data_or_null(const torch::Tensor& t) {
  return t.defined() ? t.data_ptr() : nullptr;
}

struct RmsNormFn : torch::autograd::Function<RmsNormFn> {
  static torch::Tensor forward(AutogradContext* ctx,
                               torch::Tensor x,
                               torch::Tensor weight,
                               double eps) {
    const c10::cuda::CUDAGuard guard(x.device());
    const auto cols = x.size(-1);
    auto xc = x.contiguous();
    auto w = weight.contiguous();
    auto y = torch::empty_like(xc);  // [..., C]
    auto rstd =
        torch::empty({xc.numel() / cols},
                     xc.options().dtype(c10::promoteTypes(x.scalar_type(), torch::kFloat32)));
    kernels::rms_norm_forward(kernel_dtype(xc), xc.data_ptr(), w.data_ptr(), y.data_ptr(),
                              rstd.data_ptr(), rstd.size(0), cols, eps, stream_of(xc));
    ctx->save_for_backward({xc, w, rstd});
    return y;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &w = saved[1], &rstd = saved[2];  // [..., C], [C], [rows]
    const c10::cuda::CUDAGuard guard(x.device());
    auto dy = grads[0].contiguous();
    torch::Tensor dx, dw;
    if (ctx->needs_input_grad(0)) {
      dx = torch::empty_like(x);
      kernels::rms_norm_backward(kernel_dtype(x), dy.data_ptr(), x.data_ptr(), w.data_ptr(),
                                 rstd.data_ptr(), dx.data_ptr(), rstd.size(0), x.size(-1),
                                 stream_of(x));
    }
    if (ctx->needs_input_grad(1)) {  // trained norms (LongLoRA): sum over rows of dy * normed
      const auto cols = x.size(-1);
      auto normed =
          (x.reshape({-1, cols}).to(rstd.scalar_type()) * rstd.unsqueeze(1)).to(x.scalar_type());
      dw = (dy.reshape({-1, cols}).to(rstd.scalar_type()) * normed.to(rstd.scalar_type()))
               .sum(0)
               .to(w.scalar_type());
    }
    return {dx, dw, torch::Tensor()};
  }
};

struct SwigluFn : torch::autograd::Function<SwigluFn> {
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor gate_up) {
    const c10::cuda::CUDAGuard guard(gate_up.device());
    auto gu = gate_up.contiguous();  // [..., 2I]
    auto shape = gu.sizes().vec();
    const auto cols = shape.back() / 2;
    shape.back() = cols;
    auto y = torch::empty(shape, gu.options());  // [..., I]
    kernels::swiglu_forward(kernel_dtype(gu), gu.data_ptr(), y.data_ptr(), y.numel() / cols, cols,
                            stream_of(gu));
    ctx->save_for_backward({gu});
    return y;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto gu = ctx->get_saved_variables()[0];
    const c10::cuda::CUDAGuard guard(gu.device());
    auto dy = grads[0].contiguous();
    auto dgu = torch::empty_like(gu);
    const auto cols = gu.size(-1) / 2;
    kernels::swiglu_backward(kernel_dtype(gu), dy.data_ptr(), gu.data_ptr(), dgu.data_ptr(),
                             dy.numel() / cols, cols, stream_of(gu));
    return {dgu};
  }
};

struct MoeSwigluFn : torch::autograd::Function<MoeSwigluFn> {
  // Returns {mixed} or, with keep_slots, {mixed, slots}.
  // The deltas are optional: a custom function takes no undefined tensor.
  static tensor_list forward(AutogradContext* ctx,
                             torch::Tensor gate_up,
                             c10::optional<torch::Tensor> gate_delta,
                             c10::optional<torch::Tensor> up_delta,
                             torch::Tensor weights,
                             bool keep_slots) {
    const c10::cuda::CUDAGuard guard(gate_up.device());
    auto contiguous = [](const c10::optional<torch::Tensor>& t) {
      return t ? t->contiguous() : torch::Tensor();
    };
    auto gu = gate_up.contiguous(), dg = contiguous(gate_delta), du = contiguous(up_delta);
    auto w = weights.contiguous();
    const kernels::SlotsShape shape{gu.size(0), gu.size(1) / 2, w.size(1)};
    auto mixed = torch::empty({shape.rows, shape.cols}, gu.options());
    torch::Tensor slots;
    if (keep_slots) slots = torch::empty({shape.rows, shape.k, shape.cols}, gu.options());
    kernels::moe_swiglu_forward(kernel_dtype(gu), gu.data_ptr(), data_or_null(dg), data_or_null(du),
                                w.data_ptr(), mixed.data_ptr(), data_or_null(slots), shape,
                                stream_of(gu));
    ctx->save_for_backward({gu, dg, du, w});
    if (!keep_slots) return {mixed};
    return {mixed, slots};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &gu = saved[0], &dg = saved[1], &du = saved[2], &w = saved[3];
    const c10::cuda::CUDAGuard guard(gu.device());
    const kernels::SlotsShape shape{gu.size(0), gu.size(1) / 2, w.size(1)};
    const auto dmixed = grads[0].defined() ? grads[0].contiguous()
                                           : torch::zeros({shape.rows, shape.cols}, gu.options());
    torch::Tensor dslots;
    if (grads.size() > 1 && grads[1].defined()) dslots = grads[1].contiguous();
    auto dgu = torch::empty_like(gu), dw = torch::empty_like(w);
    auto like = [](const torch::Tensor& t) { return t.defined() ? torch::empty_like(t) : t; };
    auto ddg = like(dg), ddu = like(du);
    kernels::moe_swiglu_backward(kernel_dtype(gu), dmixed.data_ptr(), data_or_null(dslots),
                                 gu.data_ptr(), data_or_null(dg), data_or_null(du), w.data_ptr(),
                                 dgu.data_ptr(), data_or_null(ddg), data_or_null(ddu),
                                 dw.data_ptr(), shape, stream_of(gu));
    return {dgu, ddg, ddu, dw, torch::Tensor()};
  }
};

// x and y [B, H, T, D] (D contiguous) by their strides, as the kernels read them.
kernels::RopeShape heads_shape(const torch::Tensor& x,
                               const torch::Tensor& y,
                               int64_t table_stride_b) {
  return {x.size(0),   x.size(1),   x.size(2),   x.size(3),   x.stride(0),   x.stride(1),
          x.stride(2), y.stride(0), y.stride(1), y.stride(2), table_stride_b};
}

// Rotates x [B, H, T, D] (D contiguous) into y [B, H, T, D] (D contiguous), any other strides.
void rope_into(const torch::Tensor& x,
               const torch::Tensor& y,
               const torch::Tensor& cos,
               const torch::Tensor& sin,
               bool inverse) {
  // A table per row ([B, T, D]) or one for all rows ([T, D]).
  const int64_t table_stride_b = cos.dim() == 3 ? x.size(2) * x.size(3) : 0;
  kernels::rope(kernel_dtype(x), x.data_ptr(), heads_shape(x, y, table_stride_b), cos.data_ptr(),
                sin.data_ptr(), y.data_ptr(), inverse, stream_of(x));
}

// y = x for x and y [B, H, T, D] (D contiguous), any other strides.
void copy_heads_into(const torch::Tensor& x, const torch::Tensor& y) {
  kernels::copy_heads(kernel_dtype(x), x.data_ptr(), heads_shape(x, y, 0), y.data_ptr(),
                      stream_of(x));
}

// A fresh [B, n, T, D] viewing a contiguous [B, T, n, D] (the projections' and flash's layout).
torch::Tensor heads_tensor(int64_t b, int64_t n, int64_t t, int64_t d, const torch::Tensor& like) {
  return torch::empty({b, t, n, d}, like.options()).transpose(1, 2);
}

struct SplitRopeFn : torch::autograd::Function<SplitRopeFn> {
  static tensor_list forward(AutogradContext* ctx,
                             torch::Tensor qkv,
                             int64_t heads,
                             int64_t kv_heads,
                             torch::Tensor cos,
                             torch::Tensor sin) {
    const c10::cuda::CUDAGuard guard(qkv.device());
    const auto b = qkv.size(0), t = qkv.size(1), d = cos.size(-1);
    auto c = cos.contiguous(), s = sin.contiguous();
    auto part = [&](int64_t first_head, int64_t n) {
      return qkv.narrow(-1, first_head * d, n * d).view({b, t, n, d}).transpose(1, 2);
    };
    auto q = heads_tensor(b, heads, t, d, qkv), k = heads_tensor(b, kv_heads, t, d, qkv);
    auto v = heads_tensor(b, kv_heads, t, d, qkv);
    rope_into(part(0, heads), q, c, s, /*inverse=*/false);
    rope_into(part(heads, kv_heads), k, c, s, /*inverse=*/false);
    copy_heads_into(part(heads + kv_heads, kv_heads), v);
    ctx->save_for_backward({c, s});
    ctx->saved_data["shape"] = torch::IValue(std::vector<int64_t>{heads, kv_heads});
    return {q, k, v};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto hk = ctx->saved_data["shape"].toIntVector();
    const auto &dq = grads[0], &dk = grads[1], &dv = grads[2];  // [B, H|KV, T, D]
    const c10::cuda::CUDAGuard guard(dq.device());
    const auto b = dq.size(0), t = dq.size(2), d = dq.size(3);
    auto dqkv = torch::empty({b, t, (hk[0] + 2 * hk[1]) * d}, dq.options());
    auto part = [&](int64_t first_head, int64_t n) {
      return dqkv.narrow(-1, first_head * d, n * d).view({b, t, n, d}).transpose(1, 2);
    };
    auto fill = [](const torch::Tensor& g, const torch::Tensor& out, auto&& write) {
      if (g.defined()) {
        write(g.stride(3) == 1 ? g : g.contiguous());
      } else {
        out.zero_();
      }
    };
    auto dq_part = part(0, hk[0]), dk_part = part(hk[0], hk[1]),
         dv_part = part(hk[0] + hk[1], hk[1]);
    fill(dq, dq_part,
         [&](const torch::Tensor& g) { rope_into(g, dq_part, saved[0], saved[1], true); });
    fill(dk, dk_part,
         [&](const torch::Tensor& g) { rope_into(g, dk_part, saved[0], saved[1], true); });
    fill(dv, dv_part, [&](const torch::Tensor& g) { copy_heads_into(g, dv_part); });
    return {dqkv, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

bool kernels_switched_off() {
  static const bool off = [] {
    const char* v = std::getenv("LORAFIT_KERNELS");
    return v && std::strcmp(v, "0") == 0;
  }();
  return off;
}

}  // namespace

bool fused_kernels_for(const torch::Tensor& x) {
  const auto t = x.scalar_type();
  return x.is_cuda() && !kernels_switched_off() &&
         (t == torch::kFloat32 || t == torch::kFloat64 || t == torch::kBFloat16 ||
          t == torch::kFloat16);
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  if (!fused_kernels_for(x) || weight.scalar_type() != x.scalar_type())
    return composite::rms_norm(x, weight, eps);
  return RmsNormFn::apply(x, weight, eps);
}

torch::Tensor swiglu(const torch::Tensor& gate_up) {
  if (!fused_kernels_for(gate_up)) return composite::swiglu(gate_up);
  return SwigluFn::apply(gate_up);
}

MoeSwiglu moe_swiglu(const torch::Tensor& gate_up,
                     const torch::Tensor& gate_delta,
                     const torch::Tensor& up_delta,
                     const torch::Tensor& weights,
                     bool keep_slots) {
  const auto acc = c10::promoteTypes(gate_up.scalar_type(), torch::kFloat32);
  auto same = [&](const torch::Tensor& d) {
    return !d.defined() || d.scalar_type() == gate_up.scalar_type();
  };
  if (!fused_kernels_for(gate_up) || gate_up.dim() != 2 || weights.size(1) > kernels::kMaxSlots ||
      weights.scalar_type() != acc || !same(gate_delta) || !same(up_delta))
    return composite::moe_swiglu(gate_up, gate_delta, up_delta, weights, keep_slots);
  auto optional = [](const torch::Tensor& t) {
    return t.defined() ? c10::optional<torch::Tensor>(t) : c10::nullopt;
  };
  const auto out =
      MoeSwigluFn::apply(gate_up, optional(gate_delta), optional(up_delta), weights, keep_slots);
  return {out[0], keep_slots ? out[1] : torch::Tensor()};
}

QKV split_rope(const torch::Tensor& qkv,
               int64_t heads,
               int64_t kv_heads,
               const torch::Tensor& cos,
               const torch::Tensor& sin) {
  // One table for all rows ([T, D]) or one per row ([B, T, D]: packed records' positions).
  const bool table_fits =
      qkv.dim() == 3 &&
      (cos.dim() == 2 ? cos.size(0) == qkv.size(1)
                      : cos.dim() == 3 && cos.size(0) == qkv.size(0) && cos.size(1) == qkv.size(1));
  if (!fused_kernels_for(qkv) || !table_fits || qkv.stride(2) != 1 ||
      cos.scalar_type() != qkv.scalar_type() || cos.size(-1) % 2 != 0)
    return composite::split_rope(qkv, heads, kv_heads, cos, sin);
  auto out = SplitRopeFn::apply(qkv, heads, kv_heads, cos, sin);
  return {out[0], out[1], out[2]};
}

std::pair<torch::Tensor, torch::Tensor> target_log_softmax(torch::Tensor logits,
                                                           const torch::Tensor& targets,
                                                           bool grad) {
  if (!fused_kernels_for(logits) || logits.dim() != 2)
    return composite::target_log_softmax(std::move(logits), targets, grad);
  const c10::cuda::CUDAGuard guard(logits.device());
  auto l = logits.contiguous();
  auto t = targets.contiguous().to(torch::kInt64);
  auto logp = torch::empty({l.size(0)},
                           l.options().dtype(c10::promoteTypes(l.scalar_type(), torch::kFloat32)));
  kernels::target_log_softmax(kernel_dtype(l), l.data_ptr(), t.data_ptr<int64_t>(), logp.data_ptr(),
                              l.size(0), l.size(1), grad, stream_of(l));
  return {logp, grad ? l : torch::Tensor()};
}

bool adamw_kernel_step(const std::vector<torch::Tensor>& p,
                       const std::vector<torch::Tensor>& g,
                       const std::vector<torch::Tensor>& m,
                       const std::vector<torch::Tensor>& v,
                       const AdamWUpdate& u,
                       const std::function<torch::Tensor(torch::Tensor)>& sum_over_ranks,
                       torch::Tensor& norm) {
  if (p.empty() || !fused_kernels_for(p[0])) return false;
  const auto device = p[0].device();
  auto fits = [&](const torch::Tensor& t, const torch::Tensor& like) {
    return t.device() == device && t.scalar_type() == torch::kFloat32 && t.is_contiguous() &&
           t.numel() == like.numel();
  };
  std::vector<kernels::AdamWTensor> tensors;
  std::vector<kernels::AdamWChunk> chunks;
  for (size_t i = 0; i < p.size(); ++i) {
    if (!fits(p[i], p[i]) || !fits(g[i], p[i]) || !fits(m[i], p[i]) || !fits(v[i], p[i]))
      return false;
    tensors.push_back({p[i].data_ptr<float>(), g[i].data_ptr<float>(), m[i].data_ptr<float>(),
                       v[i].data_ptr<float>()});
    const int64_t n = p[i].numel();
    for (int64_t b = 0; b < n; b += kernels::kAdamWChunk)
      chunks.push_back({static_cast<int64_t>(i), b, std::min(n, b + kernels::kAdamWChunk)});
  }
  const c10::cuda::CUDAGuard guard(device);
  // The tables, then the finished-blocks counter (zero), staged in pinned memory: the caching
  // host allocator holds the buffer until the stream's copy of it is done. Filled here, as
  // torch::zeros would wake a thread pool to clear a few kilobytes.
  const size_t tensor_bytes = tensors.size() * sizeof(kernels::AdamWTensor);
  const size_t chunk_bytes = chunks.size() * sizeof(kernels::AdamWChunk);
  auto staged = torch::empty({static_cast<int64_t>(tensor_bytes + chunk_bytes + sizeof(unsigned))},
                             torch::TensorOptions().dtype(torch::kUInt8).pinned_memory(true));
  auto* bytes = staged.data_ptr<uint8_t>();
  std::memcpy(bytes, tensors.data(), tensor_bytes);
  std::memcpy(bytes + tensor_bytes, chunks.data(), chunk_bytes);
  std::memset(bytes + tensor_bytes + chunk_bytes, 0, sizeof(unsigned));
  const auto table = staged.to(torch::TensorOptions().device(device), /*non_blocking=*/true);
  auto* on_device = table.data_ptr<uint8_t>();
  const auto* tensor_table = reinterpret_cast<const kernels::AdamWTensor*>(on_device);
  const auto* chunk_table = reinterpret_cast<const kernels::AdamWChunk*>(on_device + tensor_bytes);
  const auto n_chunks = static_cast<int64_t>(chunks.size());
  const auto stream = stream_of(p[0]);
  torch::Tensor sq;  // [], the squared norm of every gradient
  if (u.max_grad_norm > 0) {
    auto partials = torch::empty({n_chunks}, p[0].options());  // [chunks]
    sq = torch::empty({}, p[0].options());
    kernels::adamw_grad_sq(tensor_table, chunk_table, n_chunks, partials.data_ptr<float>(),
                           reinterpret_cast<unsigned*>(on_device + tensor_bytes + chunk_bytes),
                           sq.data_ptr<float>(), stream);
    if (sum_over_ranks) sq = sum_over_ranks(sq).contiguous();
    norm = sq.sqrt();
  }
  const kernels::AdamWScalars s{static_cast<float>(1 - u.lr * u.weight_decay),
                                static_cast<float>(u.beta1),
                                static_cast<float>(1 - u.beta1),
                                static_cast<float>(u.beta2),
                                static_cast<float>(1 - u.beta2),
                                static_cast<float>(u.eps),
                                static_cast<float>(std::sqrt(u.bias2)),
                                static_cast<float>(u.lr / u.bias1),
                                static_cast<float>(u.max_grad_norm)};
  kernels::adamw_update(tensor_table, chunk_table, n_chunks,
                        sq.defined() ? sq.data_ptr<float>() : nullptr, s, stream);
  // Written behind autograd's back: the version counters are what tells the factors' cached
  // low-precision copies (core/projection.cpp) that the parameters changed.
  for (const auto* list : {&p, &m, &v})
    for (const auto& t : *list) torch::autograd::impl::bump_version(t);
  return true;
}

bool nf4_dequantize_kernel(const Nf4Weight& q, const torch::Tensor& code2, torch::Tensor& out) {
  if (!fused_kernels_for(out)) return false;
  const c10::cuda::CUDAGuard guard(out.device());
  kernels::nf4_dequantize(kernel_dtype(out), q.packed.data_ptr<uint8_t>(),
                          q.absmax.data_ptr<uint8_t>(), q.absmax_scale.data_ptr<float>(),
                          q.offset.data_ptr<float>(), code2.data_ptr<float>(), out.data_ptr(),
                          q.rows * q.cols, stream_of(out));
  return true;
}

#else

bool nf4_dequantize_kernel(const Nf4Weight&, const torch::Tensor&, torch::Tensor&) {
  return false;
}

bool adamw_kernel_step(const std::vector<torch::Tensor>&,
                       const std::vector<torch::Tensor>&,
                       const std::vector<torch::Tensor>&,
                       const std::vector<torch::Tensor>&,
                       const AdamWUpdate&,
                       const std::function<torch::Tensor(torch::Tensor)>&,
                       torch::Tensor&) {
  return false;
}

bool fused_kernels_for(const torch::Tensor&) {
  return false;
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  return composite::rms_norm(x, weight, eps);
}

torch::Tensor swiglu(const torch::Tensor& gate_up) {
  return composite::swiglu(gate_up);
}

MoeSwiglu moe_swiglu(const torch::Tensor& gate_up,
                     const torch::Tensor& gate_delta,
                     const torch::Tensor& up_delta,
                     const torch::Tensor& weights,
                     bool keep_slots) {
  return composite::moe_swiglu(gate_up, gate_delta, up_delta, weights, keep_slots);
}

QKV split_rope(const torch::Tensor& qkv,
               int64_t heads,
               int64_t kv_heads,
               const torch::Tensor& cos,
               const torch::Tensor& sin) {
  return composite::split_rope(qkv, heads, kv_heads, cos, sin);
}

std::pair<torch::Tensor, torch::Tensor> target_log_softmax(torch::Tensor logits,
                                                           const torch::Tensor& targets,
                                                           bool grad) {
  return composite::target_log_softmax(std::move(logits), targets, grad);
}

#endif

}  // namespace lorafit
