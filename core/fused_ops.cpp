#include "core/fused_ops.h"

#include <cstdlib>
#include <cstring>

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

torch::Tensor swiglu(const torch::Tensor& gate, const torch::Tensor& up) {
  return torch::silu(gate) * up;
}

torch::Tensor apply_rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  const auto half = x.size(-1) / 2;
  auto rotated = torch::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * cos + rotated * sin;
}

std::pair<torch::Tensor, torch::Tensor> target_log_softmax(torch::Tensor logits,
                                                           const torch::Tensor& targets,
                                                           bool grad) {
  // fp32 as transformers upcasts logits; float64 stays float64.
  auto l = logits.to(c10::promoteTypes(logits.scalar_type(), torch::kFloat32));  // [n, V]
  const auto keep = targets.ge(0).unsqueeze(1);                                   // [n, 1]
  const auto t = targets.clamp_min(0).unsqueeze(1);                               // [n, 1]
  auto lse = l.logsumexp(-1, /*keepdim=*/true);                                   // [n, 1]
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
    case torch::kFloat32: return kernels::Dtype::f32;
    case torch::kFloat64: return kernels::Dtype::f64;
    case torch::kBFloat16: return kernels::Dtype::bf16;
    default: return kernels::Dtype::f16;
  }
}

kernels::Stream stream_of(const torch::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

struct RmsNormFn : torch::autograd::Function<RmsNormFn> {
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, torch::Tensor weight,
                               double eps) {
    const c10::cuda::CUDAGuard guard(x.device());
    const auto cols = x.size(-1);
    auto xc = x.contiguous();
    auto w = weight.contiguous();
    auto y = torch::empty_like(xc);  // [..., C]
    auto rstd = torch::empty({xc.numel() / cols},
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
      auto normed = (x.reshape({-1, cols}).to(rstd.scalar_type()) * rstd.unsqueeze(1))
                        .to(x.scalar_type());
      dw = (dy.reshape({-1, cols}).to(rstd.scalar_type()) * normed.to(rstd.scalar_type()))
               .sum(0)
               .to(w.scalar_type());
    }
    return {dx, dw, torch::Tensor()};
  }
};

struct SwigluFn : torch::autograd::Function<SwigluFn> {
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor gate, torch::Tensor up) {
    const c10::cuda::CUDAGuard guard(gate.device());
    auto g = gate.contiguous(), u = up.contiguous();
    auto y = torch::empty_like(g);
    kernels::swiglu_forward(kernel_dtype(g), g.data_ptr(), u.data_ptr(), y.data_ptr(), g.numel(),
                            stream_of(g));
    ctx->save_for_backward({g, u});
    return y;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &g = saved[0], &u = saved[1];
    const c10::cuda::CUDAGuard guard(g.device());
    auto dy = grads[0].contiguous();
    auto dg = torch::empty_like(g), du = torch::empty_like(u);
    kernels::swiglu_backward(kernel_dtype(g), dy.data_ptr(), g.data_ptr(), u.data_ptr(),
                             dg.data_ptr(), du.data_ptr(), g.numel(), stream_of(g));
    return {dg, du};
  }
};

// x [B, H, T, D] (any strides, D contiguous) -> [B, H, T, D] viewing a contiguous [B, T, H, D].
torch::Tensor rope_kernel(const torch::Tensor& in, const torch::Tensor& cos,
                          const torch::Tensor& sin, bool inverse) {
  const auto x = in.stride(3) == 1 ? in : in.contiguous();
  const kernels::RopeShape shape{x.size(0),   x.size(1),   x.size(2),  x.size(3),
                                 x.stride(0), x.stride(1), x.stride(2)};
  auto y = torch::empty({shape.b, shape.t, shape.h, shape.d}, x.options());
  kernels::rope(kernel_dtype(x), x.data_ptr(), shape, cos.data_ptr(), sin.data_ptr(),
                y.data_ptr(), inverse, stream_of(x));
  return y.transpose(1, 2);
}

struct RopeFn : torch::autograd::Function<RopeFn> {
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, torch::Tensor cos,
                               torch::Tensor sin) {
    const c10::cuda::CUDAGuard guard(x.device());
    auto c = cos.contiguous(), s = sin.contiguous();
    ctx->save_for_backward({c, s});
    return rope_kernel(x, c, s, /*inverse=*/false);
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const c10::cuda::CUDAGuard guard(grads[0].device());
    return {rope_kernel(grads[0], saved[0], saved[1], /*inverse=*/true), torch::Tensor(),
            torch::Tensor()};
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

torch::Tensor swiglu(const torch::Tensor& gate, const torch::Tensor& up) {
  if (!fused_kernels_for(gate) || up.scalar_type() != gate.scalar_type() ||
      up.sizes() != gate.sizes())
    return composite::swiglu(gate, up);
  return SwigluFn::apply(gate, up);
}

torch::Tensor apply_rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  if (!fused_kernels_for(x) || x.dim() != 4 || cos.scalar_type() != x.scalar_type() ||
      cos.dim() != 2 || cos.size(0) != x.size(2) || x.size(-1) % 2 != 0)
    return composite::apply_rope(x, cos, sin);
  return RopeFn::apply(x, cos, sin);
}

std::pair<torch::Tensor, torch::Tensor> target_log_softmax(torch::Tensor logits,
                                                           const torch::Tensor& targets,
                                                           bool grad) {
  if (!fused_kernels_for(logits) || logits.dim() != 2)
    return composite::target_log_softmax(std::move(logits), targets, grad);
  const c10::cuda::CUDAGuard guard(logits.device());
  auto l = logits.contiguous();
  auto t = targets.contiguous().to(torch::kInt64);
  auto logp = torch::empty(
      {l.size(0)}, l.options().dtype(c10::promoteTypes(l.scalar_type(), torch::kFloat32)));
  kernels::target_log_softmax(kernel_dtype(l), l.data_ptr(), t.data_ptr<int64_t>(),
                              logp.data_ptr(), l.size(0), l.size(1), grad, stream_of(l));
  return {logp, grad ? l : torch::Tensor()};
}

#else

bool fused_kernels_for(const torch::Tensor&) {
  return false;
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  return composite::rms_norm(x, weight, eps);
}

torch::Tensor swiglu(const torch::Tensor& gate, const torch::Tensor& up) {
  return composite::swiglu(gate, up);
}

torch::Tensor apply_rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  return composite::apply_rope(x, cos, sin);
}

std::pair<torch::Tensor, torch::Tensor> target_log_softmax(torch::Tensor logits,
                                                           const torch::Tensor& targets,
                                                           bool grad) {
  return composite::target_log_softmax(std::move(logits), targets, grad);
}

#endif

}  // namespace lorafit
