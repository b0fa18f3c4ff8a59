// The elementwise parts of a LLaMA layer (RMSNorm, SwiGLU, RoPE) and of its loss head: on a
// GPU single CUDA kernels with a hand-written backward (core/kernels.cu), elsewhere the
// composite of LibTorch ops that transformers' code is. Both round as transformers does;
// LORAFIT_KERNELS=0 in the environment selects the composites on the GPU too, to compare.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <vector>

namespace lorafit {

/// weight * T(x_f32 * rsqrt(mean(x_f32^2) + eps)), T = x's dtype.
/// x: [..., C], weight: [C] -> [..., C]
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);

/// silu(gate) * up for the fused gate and up projections.  gate_up: [..., 2I] -> [..., I]
torch::Tensor swiglu(const torch::Tensor& gate_up);

/// MixLoRA's k expert slots of each token after the gate and up projections: slot j runs
/// a_j = silu(g + dg_j) * (u + du_j) on the shared base [g | u] and its expert's LoRA deltas
/// (undefined: none there), and `mixed` is their weighted sum, summed in the weights' dtype
/// (fp32, f64 for f64) and rounded once: the down projection is linear, so the base runs it
/// once on `mixed` rather than once a slot. `slots` holds the a_j when asked for (the
/// experts' LoRA on down_proj reads them).
/// gate_up: [N, 2I], gate_delta, up_delta: [N, k, I], weights: [N, k] (fp32, or f64 for f64)
struct MoeSwiglu {
  torch::Tensor mixed;  // [N, I]
  torch::Tensor slots;  // [N, k, I], or undefined
};
MoeSwiglu moe_swiglu(const torch::Tensor& gate_up,
                     const torch::Tensor& gate_delta,
                     const torch::Tensor& up_delta,
                     const torch::Tensor& weights,
                     bool keep_slots);

/// The fused q, k, v projections split into heads, with rotary embeddings on q and k:
/// x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1) on the halves of D.
/// qkv: [B, T, (H + 2 KV) * D], cos, sin: [T, D] -> q [B, H, T, D], k, v [B, KV, T, D]
struct QKV {
  torch::Tensor q, k, v;
};
QKV split_rope(const torch::Tensor& qkv,
               int64_t heads,
               int64_t kv_heads,
               const torch::Tensor& cos,
               const torch::Tensor& sin);

/// The loss head's per-row log-softmax at the target. logits: [n, V] (the head's dtype),
/// targets: [n] (negative: ignored) -> log p [n] in fp32 (f64 for f64 logits), 0 where
/// ignored; with `grad`, also d/dlogits = onehot(target) - softmax(logits) in the logits' dtype
/// (zero rows where ignored). `logits` is consumed: its memory may be overwritten.
std::pair<torch::Tensor, torch::Tensor> target_log_softmax(torch::Tensor logits,
                                                           const torch::Tensor& targets,
                                                           bool grad);

struct Nf4Weight;
/// NF4 dequantization (core/nf4.h) of `q` into out [rows, cols] (contiguous) by the CUDA kernel,
/// with `code2` [256] the dynamic map on out's device. False, doing nothing, where no kernel
/// runs (a CPU tensor, LORAFIT_KERNELS=0, a build without kernels): the caller's composite does.
bool nf4_dequantize_kernel(const Nf4Weight& q, const torch::Tensor& code2, torch::Tensor& out);

/// One step of core/optimizer.cpp's AdamW over fp32 tensors on one GPU, as two kernels in place
/// of a dozen multi-tensor ops: each of those spends host time on every tensor (allocations,
/// checks; about 10 ms a step for the 448 tensors of LoRA on a 7B model) while the GPU, done
/// with the backward, waits for it. The first kernel sums the gradients' squares (with
/// max_grad_norm > 0; `sum_over_ranks`, where given, then adds the other ranks' sums), the
/// second clips each gradient to that norm and updates p, m and v. Returns false, doing nothing,
/// where no kernel runs (as for the ops above; or a tensor not fp32, contiguous and on p[0]'s
/// GPU); else the norm before clipping is in `norm` (0-dim; undefined without clipping).
struct AdamWUpdate {
  double lr, beta1, beta2, eps, weight_decay;
  double bias1, bias2;   // 1 - beta1^t, 1 - beta2^t
  double max_grad_norm;  // 0: no clipping
};
bool adamw_kernel_step(const std::vector<torch::Tensor>& p,
                       const std::vector<torch::Tensor>& g,
                       const std::vector<torch::Tensor>& m,
                       const std::vector<torch::Tensor>& v,
                       const AdamWUpdate& u,
                       const std::function<torch::Tensor(torch::Tensor)>& sum_over_ranks,
                       torch::Tensor& norm);

/// Whether the ops above run as CUDA kernels for tensors like `x`.
bool fused_kernels_for(const torch::Tensor& x);

/// The plain LibTorch compositions, which the kernels are tested against.
namespace composite {
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
torch::Tensor swiglu(const torch::Tensor& gate_up);
MoeSwiglu moe_swiglu(const torch::Tensor& gate_up,
                     const torch::Tensor& gate_delta,
                     const torch::Tensor& up_delta,
                     const torch::Tensor& weights,
                     bool keep_slots);
QKV split_rope(const torch::Tensor& qkv,
               int64_t heads,
               int64_t kv_heads,
               const torch::Tensor& cos,
               const torch::Tensor& sin);
std::pair<torch::Tensor, torch::Tensor> target_log_softmax(torch::Tensor logits,
                                                           const torch::Tensor& targets,
                                                           bool grad);
}  // namespace composite

}  // namespace lorafit
