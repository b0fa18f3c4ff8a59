// Launchers of lorafit's CUDA kernels (core/kernels.cu): raw pointers and sizes only, so nvcc
// never compiles a LibTorch header. core/fused_ops.cpp wraps them as autograd functions.
// Every kernel follows the rounding of the composite it replaces: each intermediate that
// transformers' code materialises in the model's dtype is rounded to that dtype here too.
#pragma once

#include <cstdint>

struct CUstream_st;

namespace lorafit::kernels {

using Stream = CUstream_st*;

enum class Dtype { f32, f64, bf16, f16 };

// RMSNorm over the last dimension of a [rows, cols] contiguous x: y = w * T(x * rstd),
// rstd = rsqrt(mean(x^2) + eps) in the accumulation type (f64 for f64, else f32), written to
// rstd [rows].
void rms_norm_forward(Dtype dt,
                      const void* x,
                      const void* w,
                      void* y,
                      void* rstd,
                      int64_t rows,
                      int64_t cols,
                      double eps,
                      Stream stream);
// dx for dy [rows, cols] contiguous, with x, w and the forward's rstd.
void rms_norm_backward(Dtype dt,
                       const void* dy,
                       const void* x,
                       const void* w,
                       const void* rstd,
                       void* dx,
                       int64_t rows,
                       int64_t cols,
                       Stream stream);

// y = T(T(silu(g)) * u) for gu [rows, 2 * cols] holding [g | u] per row (the fused gate and up
// projections), y [rows, cols]; the backward writes dgu [rows, 2 * cols] the same way.
void swiglu_forward(Dtype dt, const void* gu, void* y, int64_t rows, int64_t cols, Stream stream);
void swiglu_backward(
    Dtype dt, const void* dy, const void* gu, void* dgu, int64_t rows, int64_t cols, Stream stream);

// MixLoRA's k expert slots after their gate and up projections, each row of the shared base
// gu [rows, 2 * cols] with slot j's deltas dg, du [rows, k, cols] (either may be null: no
// expert LoRA there): a_j = T(T(silu(T(g + dg_j))) * T(u + du_j)), and their mix
// mixed = T(sum_j w_j a_j) [rows, cols] with w [rows, k] in the accumulation type, summed
// there. `slots` [rows, k, cols] receives every a_j where it is not null. k <= kMaxSlots.
constexpr int kMaxSlots = 8;
struct SlotsShape {
  int64_t rows, cols, k;
};
void moe_swiglu_forward(Dtype dt,
                        const void* gu,
                        const void* dg,
                        const void* du,
                        const void* w,
                        void* mixed,
                        void* slots,
                        const SlotsShape& shape,
                        Stream stream);
// The gradients for dmixed [rows, cols] and dslots [rows, k, cols] (null: none): dgu [rows, 2 *
// cols], ddg and ddu [rows, k, cols] where dg and du are given, dw [rows, k] (accumulation
// type).
void moe_swiglu_backward(Dtype dt,
                         const void* dmixed,
                         const void* dslots,
                         const void* gu,
                         const void* dg,
                         const void* du,
                         const void* w,
                         void* dgu,
                         void* ddg,
                         void* ddu,
                         void* dw,
                         const SlotsShape& shape,
                         Stream stream);

// For logits [n, vocab] contiguous and targets [n]: logp[i] = log softmax(logits[i])[target]
// in the accumulation type, 0 where the target is negative (ignored). With `grad` the logits
// are overwritten by onehot(target) - softmax(logits) (the gradient of logp), zero rows where
// ignored.
void target_log_softmax(Dtype dt,
                        void* logits,
                        const int64_t* targets,
                        void* logp,
                        int64_t n,
                        int64_t vocab,
                        bool grad,
                        Stream stream);

// Rotary embedding with rotate_half on x [B, H, T, D] into y [B, H, T, D], both given by
// their strides in elements (D contiguous), cos and sin [T, D] contiguous, or [B, T, D]
// (packed rows, each token its record's position) with table_stride_b = T * D. With `inverse`
// set it computes the gradient: dx = dy * cos + rotate_half^T(dy * sin).
struct RopeShape {
  int64_t b, h, t, d;
  int64_t stride_b, stride_h, stride_t;              // x
  int64_t out_stride_b, out_stride_h, out_stride_t;  // y
  int64_t table_stride_b;                            // cos, sin: 0 for one table for all rows
};
void rope(Dtype dt,
          const void* x,
          const RopeShape& shape,
          const void* cos,
          const void* sin,
          void* y,
          bool inverse,
          Stream stream);

// AdamW over many fp32 tensors in two launches, for core/optimizer.cpp: the tensors and their
// chunks of at most kAdamWChunk elements (one block each) sit in device memory, as
// core/fused_ops.cpp copies them there each step (the gradients are new tensors every step).
constexpr int64_t kAdamWChunk = 16384;
struct AdamWTensor {
  float* p;        // the parameter
  const float* g;  // its gradient
  float* m;        // first moment
  float* v;        // second moment
};
struct AdamWChunk {
  int64_t tensor, begin, end;  // elements [begin, end) of tensors[tensor]
};
// sq = sum of every gradient's squares, summed in a fixed order whatever the block timing:
// each chunk's sum goes to partials [chunks], and the last block to finish adds them up and
// resets `done` (one counter, zero before the first call) to zero.
void adamw_grad_sq(const AdamWTensor* tensors,
                   const AdamWChunk* chunks,
                   int64_t n_chunks,
                   float* partials,
                   unsigned* done,
                   float* sq,
                   Stream stream);
// With the gradient g scaled by c = min(1, max_grad_norm / (sqrt(*sq) + 1e-6)) (c = 1 where
// sq is null): p *= decay; m = beta1 m + (1 - beta1) g; v = beta2 v + (1 - beta2) g^2;
// p -= step_size (m / (sqrt(v) / sqrt_bias2 + eps)), in the order and rounding of the multi-tensor
// ops that core/optimizer.cpp runs elsewhere (each scalar rounded from double once, as theirs).
struct AdamWScalars {
  float decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, sqrt_bias2, step_size,
      max_grad_norm;
};
void adamw_update(const AdamWTensor* tensors,
                  const AdamWChunk* chunks,
                  int64_t n_chunks,
                  const float* sq,
                  const AdamWScalars& s,
                  Stream stream);

// y = x for x and y [B, H, T, D] given by their strides as in RopeShape (D contiguous; the
// tables' stride unused): v's heads out of the fused q/k/v output and their gradient back, in
// 16-byte moves where LibTorch's strided copy moves an element a thread.
void copy_heads(Dtype dt, const void* x, const RopeShape& shape, void* y, Stream stream);

// The 16 NF4 values (bitsandbytes' table), shared by the kernel and core/nf4.cpp.
constexpr float kNf4Values[16] = {-1.0f,
                                  -0.6961928009986877f,
                                  -0.5250730514526367f,
                                  -0.39491748809814453f,
                                  -0.28444138169288635f,
                                  -0.18477343022823334f,
                                  -0.09105003625154495f,
                                  0.0f,
                                  0.07958029955625534f,
                                  0.16093020141124725f,
                                  0.24611230194568634f,
                                  0.33791524171829224f,
                                  0.44070982933044434f,
                                  0.5626170039176941f,
                                  0.7229568362236023f,
                                  1.0f};

// NF4 dequantization (core/nf4.h) of n weights into out [n] (T = dt): value i is
// nf4[code i] * absmax of block i / 64, rounded once to T, where the block's absmax is
// dynamic_map[absmax_codes[b]] * absmax_scale[b / 256] + *offset in fp32 (no fused multiply-add,
// as LibTorch's ops compute it).
void nf4_dequantize(Dtype dt,
                    const uint8_t* packed,
                    const uint8_t* absmax_codes,
                    const float* absmax_scale,
                    const float* offset,
                    const float* dynamic_map,
                    void* out,
                    int64_t n,
                    Stream stream);

}  // namespace lorafit::kernels
