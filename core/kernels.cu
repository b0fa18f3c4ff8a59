// lorafit's CUDA kernels: RMSNorm, SwiGLU, RoPE and the loss head's log-softmax, forward and
// backward, each one or two passes over memory where the composite of LibTorch ops takes five
// to ten; NF4 dequantization; AdamW's step over all trained tensors. See core/kernels.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "core/kernels.h"

namespace lorafit::kernels {

namespace {

// Arithmetic happens in Acc (float, or double for double); values are rounded to T wherever
// the composite holds a T tensor.
template <typename T>
struct Num {
  using Acc = float;
  static __device__ float load(T v) { return static_cast<float>(v); }
  static __device__ T round(float v) { return static_cast<T>(v); }
};
template <>
struct Num<double> {
  using Acc = double;
  static __device__ double load(double v) { return v; }
  static __device__ double round(double v) { return v; }
};
template <>
struct Num<__nv_bfloat16> {
  using Acc = float;
  static __device__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __nv_bfloat16 round(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Num<__half> {
  using Acc = float;
  static __device__ float load(__half v) { return __half2float(v); }
  static __device__ __half round(float v) { return __float2half_rn(v); }
};

// T -> T: the rounding a composite's intermediate tensor applies.
template <typename T>
__device__ typename Num<T>::Acc r(typename Num<T>::Acc v) {
  return Num<T>::load(Num<T>::round(v));
}

constexpr int kBlock = 256;

// N consecutive elements moved as one 16-byte access where the layout allows it.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T>
constexpr int kWide = 16 / sizeof(T);

bool aligned(const void* p, int64_t elements_multiple, int64_t n, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && (elements_multiple * bytes) % 16 == 0 &&
         n % (16 / bytes) == 0;
}

// Whether 16-byte loads fit every given [rows, cols] buffer (a null one is absent).
bool rows_aligned(std::initializer_list<const void*> buffers, int64_t cols, int bytes) {
  for (const void* p : buffers)
    if (p && !aligned(p, cols, cols, bytes)) return false;
  return true;
}

// Whether every row of a walk over heads (RopeShape) starts on a 16-byte boundary, in x, in y
// and in the given buffers.
bool heads_aligned(const RopeShape& s, int bytes, std::initializer_list<const void*> buffers) {
  for (int64_t stride :
       {s.stride_b, s.stride_h, s.stride_t, s.out_stride_b, s.out_stride_h, s.out_stride_t})
    if (stride * bytes % 16 != 0) return false;
  for (const void* p : buffers)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// Where element idx of a walk over the [B, T, H] rows of a RopeShape falls, `groups` packs of N
// a row (D, then the heads, fastest: the order both layouts store them in): the row's start in
// x and in y, its b and t, and the first element j of its pack.
struct HeadRow {
  int64_t x, y, b, t, j;
};
template <int N>
__device__ HeadRow head_row(const RopeShape& s, int64_t idx, int64_t groups) {
  const int64_t row = idx / groups;  // (b * T + t) * H + h
  const int64_t h = row % s.h, bt = row / s.h;
  const int64_t t = bt % s.t, b = bt / s.t;
  return {b * s.stride_b + h * s.stride_h + t * s.stride_t,
          b * s.out_stride_b + h * s.out_stride_h + t * s.out_stride_t, b, t, (idx % groups) * N};
}

// Sum over the block; every thread gets the result.
template <typename Acc>
__device__ Acc block_sum(Acc v) {
  __shared__ Acc partial[kBlock / 32];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffff, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  Acc total = 0;
  for (int i = 0; i < kBlock / 32; ++i) total += partial[i];
  __syncthreads();  // partial is reused by the next call
  return total;
}

template <typename T>
__global__ void rms_norm_forward_kernel(const T* __restrict__ x,
                                        const T* __restrict__ w,
                                        T* __restrict__ y,
                                        typename Num<T>::Acc* __restrict__ rstd,
                                        int64_t cols,
                                        double eps) {
  using Acc = typename Num<T>::Acc;
  const T* xr = x + blockIdx.x * cols;
  T* yr = y + blockIdx.x * cols;
  Acc sq = 0;
  for (int64_t i = threadIdx.x; i < cols; i += kBlock) {
    const Acc v = Num<T>::load(xr[i]);
    sq += v * v;
  }
  const Acc rs = rsqrt(block_sum(sq) / static_cast<Acc>(cols) + static_cast<Acc>(eps));
  if (threadIdx.x == 0) rstd[blockIdx.x] = rs;
  for (int64_t i = threadIdx.x; i < cols; i += kBlock) {
    const Acc normed = r<T>(Num<T>::load(xr[i]) * rs);
    yr[i] = Num<T>::round(Num<T>::load(w[i]) * normed);
  }
}

// dx_j = rstd * g_j - rstd^3 * x_j * sum_i(g_i x_i) / cols, g = dy * w.
template <typename T>
__global__ void rms_norm_backward_kernel(const T* __restrict__ dy,
                                         const T* __restrict__ x,
                                         const T* __restrict__ w,
                                         const typename Num<T>::Acc* __restrict__ rstd,
                                         T* __restrict__ dx,
                                         int64_t cols) {
  using Acc = typename Num<T>::Acc;
  const T* xr = x + blockIdx.x * cols;
  const T* dyr = dy + blockIdx.x * cols;
  T* dxr = dx + blockIdx.x * cols;
  Acc dot = 0;
  for (int64_t i = threadIdx.x; i < cols; i += kBlock) {
    const Acc g = r<T>(Num<T>::load(dyr[i]) * Num<T>::load(w[i]));
    dot += g * Num<T>::load(xr[i]);
  }
  const Acc rs = rstd[blockIdx.x];
  const Acc k = rs * rs * rs * block_sum(dot) / static_cast<Acc>(cols);
  for (int64_t i = threadIdx.x; i < cols; i += kBlock) {
    const Acc g = r<T>(Num<T>::load(dyr[i]) * Num<T>::load(w[i]));
    dxr[i] = Num<T>::round(rs * g - k * Num<T>::load(xr[i]));
  }
}

// As LibTorch's kernels write them, so the results round the same way.
template <typename Acc>
__device__ Acc silu(Acc v) {
  return v / (Acc(1) + exp(-v));
}

// Element i of y [rows, cols] reads g and u at the same column of row i / cols of gu.
template <typename T, int N>
__global__ void swiglu_forward_kernel(const T* __restrict__ gu,
                                      T* __restrict__ y,
                                      int64_t rows,
                                      int64_t cols) {
  using Acc = typename Num<T>::Acc;
  using P = Pack<T, N>;
  for (int64_t i = blockIdx.x * int64_t(kBlock) + threadIdx.x; i < rows * cols / N;
       i += int64_t(gridDim.x) * kBlock) {
    const int64_t row = i * N / cols, col = i * N % cols;
    const P gp = *reinterpret_cast<const P*>(gu + row * 2 * cols + col);
    const P up = *reinterpret_cast<const P*>(gu + row * 2 * cols + cols + col);
    P yp;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const Acc s = r<T>(silu(Num<T>::load(gp.v[k])));
      yp.v[k] = Num<T>::round(s * Num<T>::load(up.v[k]));
    }
    reinterpret_cast<P*>(y)[i] = yp;
  }
}

template <typename T, int N>
__global__ void swiglu_backward_kernel(const T* __restrict__ dy,
                                       const T* __restrict__ gu,
                                       T* __restrict__ dgu,
                                       int64_t rows,
                                       int64_t cols) {
  using Acc = typename Num<T>::Acc;
  using P = Pack<T, N>;
  for (int64_t i = blockIdx.x * int64_t(kBlock) + threadIdx.x; i < rows * cols / N;
       i += int64_t(gridDim.x) * kBlock) {
    const int64_t row = i * N / cols, col = i * N % cols;
    const int64_t g_at = row * 2 * cols + col, u_at = g_at + cols;
    const P dyp = reinterpret_cast<const P*>(dy)[i];
    const P gp = *reinterpret_cast<const P*>(gu + g_at),
            up = *reinterpret_cast<const P*>(gu + u_at);
    P dgp, dup;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const Acc gv = Num<T>::load(gp.v[k]), dyv = Num<T>::load(dyp.v[k]);
      const Acc sig = Acc(1) / (Acc(1) + exp(-gv));
      dup.v[k] = Num<T>::round(dyv * r<T>(silu(gv)));
      const Acc ds = r<T>(dyv * Num<T>::load(up.v[k]));
      dgp.v[k] = Num<T>::round(ds * sig * (Acc(1) + gv * (Acc(1) - sig)));
    }
    *reinterpret_cast<P*>(dgu + g_at) = dgp;
    *reinterpret_cast<P*>(dgu + u_at) = dup;
  }
}

// One row of MixLoRA's slots: the shared base g and u and each slot's deltas, as the
// composite rounds them (its adds, silu and product in T).
template <typename T, int N>
struct SlotRow {
  using Acc = typename Num<T>::Acc;
  using P = Pack<T, N>;
  const T *gu, *dg, *du;  // gu: [2 * cols] of this row; dg, du: [k, cols] of this row or null
  int64_t cols;
  P g, u;  // the base at column `col`

  __device__ void load_base(int64_t col) {
    g = *reinterpret_cast<const P*>(gu + col);
    u = *reinterpret_cast<const P*>(gu + cols + col);
  }
  // Slot j's gate and up inputs at column `col`, element `e` of the pack.
  __device__ Acc gate(const P& d, int e) const {
    return dg ? r<T>(Num<T>::load(g.v[e]) + Num<T>::load(d.v[e])) : Num<T>::load(g.v[e]);
  }
  __device__ Acc up(const P& d, int e) const {
    return du ? r<T>(Num<T>::load(u.v[e]) + Num<T>::load(d.v[e])) : Num<T>::load(u.v[e]);
  }
  __device__ P delta(const T* d, int j, int64_t col) const {
    return d ? *reinterpret_cast<const P*>(d + j * cols + col) : P{};
  }
};

template <typename T, int N>
__global__ void moe_swiglu_forward_kernel(const T* __restrict__ gu,
                                          const T* __restrict__ dg,
                                          const T* __restrict__ du,
                                          const typename Num<T>::Acc* __restrict__ w,
                                          T* __restrict__ mixed,
                                          T* __restrict__ slots,
                                          int64_t cols,
                                          int k) {
  using Acc = typename Num<T>::Acc;
  using P = Pack<T, N>;
  const int64_t row = blockIdx.x;
  const int64_t at = row * k * cols;
  SlotRow<T, N> s{gu + row * 2 * cols, dg ? dg + at : nullptr, du ? du + at : nullptr, cols};
  for (int64_t col = threadIdx.x * int64_t(N); col < cols; col += int64_t(kBlock) * N) {
    s.load_base(col);
    Acc sum[N] = {};
#pragma unroll
    for (int j = 0; j < kMaxSlots; ++j) {
      if (j >= k) break;
      const P gd = s.delta(s.dg, j, col), ud = s.delta(s.du, j, col);
      const Acc wj = w[row * k + j];
      P a;
#pragma unroll
      for (int e = 0; e < N; ++e) {
        a.v[e] = Num<T>::round(r<T>(silu(s.gate(gd, e))) * s.up(ud, e));
        sum[e] += wj * Num<T>::load(a.v[e]);
      }
      if (slots) *reinterpret_cast<P*>(slots + at + j * cols + col) = a;
    }
    P m;
#pragma unroll
    for (int e = 0; e < N; ++e) m.v[e] = Num<T>::round(sum[e]);
    *reinterpret_cast<P*>(mixed + row * cols + col) = m;
  }
}

// One block a row: dw needs the row's sum over its columns.
template <typename T, int N>
__global__ void moe_swiglu_backward_kernel(const T* __restrict__ dmixed,
                                           const T* __restrict__ dslots,
                                           const T* __restrict__ gu,
                                           const T* __restrict__ dg,
                                           const T* __restrict__ du,
                                           const typename Num<T>::Acc* __restrict__ w,
                                           T* __restrict__ dgu,
                                           T* __restrict__ ddg,
                                           T* __restrict__ ddu,
                                           typename Num<T>::Acc* __restrict__ dw,
                                           int64_t cols,
                                           int k) {
  using Acc = typename Num<T>::Acc;
  using P = Pack<T, N>;
  const int64_t row = blockIdx.x;
  const int64_t at = row * k * cols;
  SlotRow<T, N> s{gu + row * 2 * cols, dg ? dg + at : nullptr, du ? du + at : nullptr, cols};
  // Without deltas every slot shares one input, whose gradient is the slots' summed.
  const bool per_slot = dg || du;
  Acc dw_part[kMaxSlots] = {};
  for (int64_t col = threadIdx.x * int64_t(N); col < cols; col += int64_t(kBlock) * N) {
    s.load_base(col);
    const P dm = *reinterpret_cast<const P*>(dmixed + row * cols + col);
    Acc g_sum[N] = {}, u_sum[N] = {}, a_sum[N] = {};
#pragma unroll
    for (int j = 0; j < kMaxSlots; ++j) {
      if (j >= k) break;
      const P gd = s.delta(s.dg, j, col), ud = s.delta(s.du, j, col);
      const P ds = s.delta(dslots ? dslots + at : nullptr, j, col);
      const Acc wj = w[row * k + j];
      P dgp, dup;
#pragma unroll
      for (int e = 0; e < N; ++e) {
        const Acc gv = s.gate(gd, e), uv = s.up(ud, e);
        const Acc silu_g = r<T>(silu(gv));
        const Acc dmv = Num<T>::load(dm.v[e]);
        dw_part[j] += dmv * r<T>(silu_g * uv);
        Acc da = r<T>(wj * dmv);
        if (dslots) da = r<T>(da + Num<T>::load(ds.v[e]));
        if (!per_slot) {
          a_sum[e] += da;
          continue;
        }
        const Acc sig = Acc(1) / (Acc(1) + exp(-gv));
        dup.v[e] = Num<T>::round(da * silu_g);
        dgp.v[e] = Num<T>::round(r<T>(da * uv) * sig * (Acc(1) + gv * (Acc(1) - sig)));
        g_sum[e] += Num<T>::load(dgp.v[e]);
        u_sum[e] += Num<T>::load(dup.v[e]);
      }
      if (ddg) *reinterpret_cast<P*>(ddg + at + j * cols + col) = dgp;
      if (ddu) *reinterpret_cast<P*>(ddu + at + j * cols + col) = dup;
    }
    P gp, up;
#pragma unroll
    for (int e = 0; e < N; ++e) {
      if (per_slot) {
        gp.v[e] = Num<T>::round(g_sum[e]);
        up.v[e] = Num<T>::round(u_sum[e]);
        continue;
      }
      const Acc gv = Num<T>::load(s.g.v[e]), da = r<T>(a_sum[e]);
      const Acc sig = Acc(1) / (Acc(1) + exp(-gv));
      up.v[e] = Num<T>::round(da * r<T>(silu(gv)));
      gp.v[e] =
          Num<T>::round(r<T>(da * Num<T>::load(s.u.v[e])) * sig * (Acc(1) + gv * (Acc(1) - sig)));
    }
    *reinterpret_cast<P*>(dgu + row * 2 * cols + col) = gp;
    *reinterpret_cast<P*>(dgu + row * 2 * cols + cols + col) = up;
  }
#pragma unroll
  for (int j = 0; j < kMaxSlots; ++j) {
    if (j >= k) break;
    const Acc total = block_sum(dw_part[j]);
    if (threadIdx.x == 0) dw[row * k + j] = total;
  }
}

// Per row of logits [n, V]: log softmax at the target, in one pass (online max and sum), and
// with `grad` the row overwritten by onehot(target) - softmax. Negative targets: 0 and a zero
// row.
template <typename Acc>
struct MaxSum {
  Acc m, s;  // running max and sum of exp(x - m)
};

template <typename Acc>
__device__ MaxSum<Acc> merge(MaxSum<Acc> a, MaxSum<Acc> b) {
  if (b.s == Acc(0)) return a;
  if (a.s == Acc(0)) return b;
  const Acc m = a.m > b.m ? a.m : b.m;
  return {m, a.s * exp(a.m - m) + b.s * exp(b.m - m)};
}

template <typename T, int N>
__global__ void target_log_softmax_kernel(T* __restrict__ logits,
                                          const int64_t* __restrict__ targets,
                                          typename Num<T>::Acc* __restrict__ logp,
                                          int64_t V,
                                          bool grad) {
  using Acc = typename Num<T>::Acc;
  using P = Pack<T, N>;
  T* row = logits + blockIdx.x * V;
  P* prow = reinterpret_cast<P*>(row);
  const int64_t target = targets[blockIdx.x];
  if (target < 0) {
    if (threadIdx.x == 0) logp[blockIdx.x] = 0;
    if (grad) {
      P zero;
#pragma unroll
      for (int k = 0; k < N; ++k) zero.v[k] = Num<T>::round(Acc(0));
      for (int64_t i = threadIdx.x; i < V / N; i += kBlock) prow[i] = zero;
    }
    return;
  }
  Acc m = -INFINITY, sum = 0;  // one exp per element: rescale only when the max grows
  for (int64_t i = threadIdx.x; i < V / N; i += kBlock) {
    const P p = prow[i];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const Acc v = Num<T>::load(p.v[k]);
      if (v > m) {
        sum = sum * exp(m - v) + Acc(1);
        m = v;
      } else {
        sum += exp(v - m);
      }
    }
  }
  MaxSum<Acc> ms{m, sum};
  for (int offset = 16; offset > 0; offset /= 2) {
    const MaxSum<Acc> other{__shfl_xor_sync(0xffffffff, ms.m, offset),
                            __shfl_xor_sync(0xffffffff, ms.s, offset)};
    ms = merge(ms, other);
  }
  __shared__ MaxSum<Acc> partial[kBlock / 32];
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = ms;
  __syncthreads();
  MaxSum<Acc> all{0, 0};
  for (int w = 0; w < kBlock / 32; ++w) all = merge(all, partial[w]);
  const Acc lse = all.m + log(all.s);
  const Acc target_logit = Num<T>::load(row[target]);
  __syncthreads();  // every thread has read row[target] before it is overwritten
  if (threadIdx.x == 0) logp[blockIdx.x] = target_logit - lse;
  if (!grad) return;
  for (int64_t i = threadIdx.x; i < V / N; i += kBlock) {
    P p = prow[i];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const Acc d = -exp(Num<T>::load(p.v[k]) - lse);
      p.v[k] = Num<T>::round(i * N + k == target ? d + Acc(1) : d);
    }
    prow[i] = p;
  }
}

// One thread per N consecutive pairs (j, j + D/2) of one (b, t, h) row, in (b, t, h) order
// (the projections' memory order).
template <typename T, int N>
__global__ void rope_kernel(const T* __restrict__ x,
                            RopeShape s,
                            const T* __restrict__ cos,
                            const T* __restrict__ sin,
                            T* __restrict__ y,
                            bool inverse) {
  using Acc = typename Num<T>::Acc;
  using P = Pack<T, N>;
  const int64_t half = s.d / 2, groups = half / N;
  const int64_t total = s.b * s.t * s.h * groups;
  for (int64_t idx = blockIdx.x * int64_t(kBlock) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * kBlock) {
    const HeadRow at_row = head_row<N>(s, idx, groups);
    const int64_t j = at_row.j;
    const T* xr = x + at_row.x;
    T* yr = y + at_row.y;
    const P x1 = *reinterpret_cast<const P*>(xr + j),
            x2 = *reinterpret_cast<const P*>(xr + j + half);
    const int64_t at = at_row.b * s.table_stride_b + at_row.t * s.d + j;
    const P c1 = *reinterpret_cast<const P*>(cos + at),
            c2 = *reinterpret_cast<const P*>(cos + at + half);
    const P s1 = *reinterpret_cast<const P*>(sin + at),
            s2 = *reinterpret_cast<const P*>(sin + at + half);
    P y1, y2;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const Acc a = Num<T>::load(x1.v[k]), b2 = Num<T>::load(x2.v[k]);
      const Acc cc1 = Num<T>::load(c1.v[k]), cc2 = Num<T>::load(c2.v[k]);
      const Acc ss1 = Num<T>::load(s1.v[k]), ss2 = Num<T>::load(s2.v[k]);
      if (!inverse) {
        // y = x * cos + cat(-x2, x1) * sin
        y1.v[k] = Num<T>::round(r<T>(a * cc1) + r<T>(-b2 * ss1));
        y2.v[k] = Num<T>::round(r<T>(b2 * cc2) + r<T>(a * ss2));
      } else {
        // dx1 = dy1 * cos1 + dy2 * sin2, dx2 = dy2 * cos2 - dy1 * sin1
        y1.v[k] = Num<T>::round(r<T>(a * cc1) + r<T>(b2 * ss2));
        y2.v[k] = Num<T>::round(r<T>(b2 * cc2) - r<T>(a * ss1));
      }
    }
    *reinterpret_cast<P*>(yr + j) = y1;
    *reinterpret_cast<P*>(yr + j + half) = y2;
  }
}

// The table travels by value as a kernel argument.
struct Nf4Table {
  float v[16];
};

// Each thread decodes W consecutive weights (W = 32: half a block of 64, its 16 bytes of codes
// read as one access, written as four 8-wide stores; or W = 1 where the layout does not allow
// it), so that the block absmax's chain of three loads serves 32 weights.
template <typename T, int W>
__global__ void nf4_dequantize_kernel(const uint8_t* __restrict__ packed,
                                      const uint8_t* __restrict__ absmax_codes,
                                      const float* __restrict__ absmax_scale,
                                      const float* __restrict__ offset,
                                      const float* __restrict__ dynamic_map,
                                      Nf4Table codes,
                                      T* __restrict__ out,
                                      int64_t n) {
  // The table in shared memory: a warp's lanes read different entries, which constant memory
  // (the arguments') would serialise and shared memory serves in one pass (16 values, 16 banks).
  __shared__ float table[16];
  if (threadIdx.x < 16) table[threadIdx.x] = codes.v[threadIdx.x];
  __syncthreads();
  const float off = __ldg(offset);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x * W;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * W; i < n;
       i += step) {
    const int64_t b = i / 64;
    const float absmax = __fadd_rn(
        __fmul_rn(__ldg(dynamic_map + __ldg(absmax_codes + b)), __ldg(absmax_scale + b / 256)),
        off);
    if constexpr (W > 1) {
      static_assert(W == 32, "a thread decodes 16 bytes of codes");
      using P = Pack<T, 8>;
      const uint4 bytes = __ldg(reinterpret_cast<const uint4*>(packed + i / 2));
      const uint32_t words[4] = {bytes.x, bytes.y, bytes.z, bytes.w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        P y;
#pragma unroll
        for (int k = 0; k < 4; ++k) {  // little-endian: byte k of the word is element pair k
          const uint32_t byte = (words[w] >> (8 * k)) & 0xff;
          y.v[2 * k] = Num<T>::round(__fmul_rn(table[byte >> 4], absmax));
          y.v[2 * k + 1] = Num<T>::round(__fmul_rn(table[byte & 15], absmax));
        }
        *reinterpret_cast<P*>(out + i + 8 * w) = y;
      }
    } else {
      const uint8_t byte = packed[i / 2];
      out[i] = Num<T>::round(__fmul_rn(table[i % 2 ? byte & 15 : byte >> 4], absmax));
    }
  }
}

__global__ void adamw_grad_sq_kernel(const AdamWTensor* __restrict__ tensors,
                                     const AdamWChunk* __restrict__ chunks,
                                     float* __restrict__ partials,
                                     unsigned* __restrict__ done,
                                     float* __restrict__ sq) {
  const AdamWChunk c = chunks[blockIdx.x];
  const float* g = tensors[c.tensor].g;
  float s = 0;
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += kBlock) s += g[i] * g[i];
  s = block_sum(s);
  __shared__ bool last;
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = s;
    __threadfence();  // the partial is visible before the count says so
    last = atomicAdd(done, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  float total = 0;
  for (unsigned i = threadIdx.x; i < gridDim.x; i += kBlock) total += __ldcg(partials + i);
  total = block_sum(total);
  if (threadIdx.x == 0) {
    *sq = total;
    *done = 0;
  }
}

__global__ void adamw_update_kernel(const AdamWTensor* __restrict__ tensors,
                                    const AdamWChunk* __restrict__ chunks,
                                    const float* __restrict__ sq,
                                    AdamWScalars s) {
  const AdamWChunk c = chunks[blockIdx.x];
  const AdamWTensor t = tensors[c.tensor];
  // As clamp_max: a NaN norm makes the gradients NaN, as clip_grad_norm_ does (fminf would not).
  const float coef = sq ? s.max_grad_norm / (sqrtf(*sq) + 1e-6f) : 1.0f;
  const float clip = coef >= 1.0f ? 1.0f : coef;
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += kBlock) {
    const float g = t.g[i] * clip;
    const float m = t.m[i] * s.beta1 + s.one_minus_beta1 * g;
    const float v = t.v[i] * s.beta2 + s.one_minus_beta2 * (g * g);
    const float denom = sqrtf(v) / s.sqrt_bias2 + s.eps;
    t.m[i] = m;
    t.v[i] = v;
    t.p[i] = t.p[i] * s.decay - s.step_size * (m / denom);
  }
}

template <typename T, int N>
__global__ void copy_heads_kernel(const T* __restrict__ x, RopeShape s, T* __restrict__ y) {
  using P = Pack<T, N>;
  const int64_t groups = s.d / N;
  const int64_t total = s.b * s.t * s.h * groups;
  for (int64_t idx = blockIdx.x * int64_t(kBlock) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * kBlock) {
    const HeadRow at_row = head_row<N>(s, idx, groups);
    *reinterpret_cast<P*>(y + at_row.y + at_row.j) =
        *reinterpret_cast<const P*>(x + at_row.x + at_row.j);
  }
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) +
                             ": CUDA launch failed: " + cudaGetErrorString(err));
}

unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  return static_cast<unsigned>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

// Calls f with a null pointer of the C++ type that `dt` names.
template <typename F>
void dispatch(Dtype dt, F&& f) {
  switch (dt) {
    case Dtype::f32:
      return f(static_cast<float*>(nullptr));
    case Dtype::f64:
      return f(static_cast<double*>(nullptr));
    case Dtype::bf16:
      return f(static_cast<__nv_bfloat16*>(nullptr));
    case Dtype::f16:
      return f(static_cast<__half*>(nullptr));
  }
}

}  // namespace

void rms_norm_forward(Dtype dt,
                      const void* x,
                      const void* w,
                      void* y,
                      void* rstd,
                      int64_t rows,
                      int64_t cols,
                      double eps,
                      Stream stream) {
  if (rows == 0) return;
  dispatch(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using Acc = typename Num<T>::Acc;
    rms_norm_forward_kernel<T>
        <<<rows, kBlock, 0, stream>>>(static_cast<const T*>(x), static_cast<const T*>(w),
                                      static_cast<T*>(y), static_cast<Acc*>(rstd), cols, eps);
  });
  check_launch("rms_norm_forward");
}

void rms_norm_backward(Dtype dt,
                       const void* dy,
                       const void* x,
                       const void* w,
                       const void* rstd,
                       void* dx,
                       int64_t rows,
                       int64_t cols,
                       Stream stream) {
  if (rows == 0) return;
  dispatch(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using Acc = typename Num<T>::Acc;
    rms_norm_backward_kernel<T><<<rows, kBlock, 0, stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(w),
        static_cast<const Acc*>(rstd), static_cast<T*>(dx), cols);
  });
  check_launch("rms_norm_backward");
}

void swiglu_forward(Dtype dt, const void* gu, void* y, int64_t rows, int64_t cols, Stream stream) {
  if (rows * cols == 0) return;
  dispatch(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int W = kWide<T>;
    const bool wide = rows_aligned({gu, y}, cols, sizeof(T));
    auto launch = [&](auto kernel, int per) {
      kernel<<<grid_for(rows * cols / per), kBlock, 0, stream>>>(static_cast<const T*>(gu),
                                                                 static_cast<T*>(y), rows, cols);
    };
    wide ? launch(swiglu_forward_kernel<T, W>, W) : launch(swiglu_forward_kernel<T, 1>, 1);
  });
  check_launch("swiglu_forward");
}

void swiglu_backward(Dtype dt,
                     const void* dy,
                     const void* gu,
                     void* dgu,
                     int64_t rows,
                     int64_t cols,
                     Stream stream) {
  if (rows * cols == 0) return;
  dispatch(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int W = kWide<T>;
    const bool wide = rows_aligned({dy, gu, dgu}, cols, sizeof(T));
    auto launch = [&](auto kernel, int per) {
      kernel<<<grid_for(rows * cols / per), kBlock, 0, stream>>>(
          static_cast<const T*>(dy), static_cast<const T*>(gu), static_cast<T*>(dgu), rows, cols);
    };
    wide ? launch(swiglu_backward_kernel<T, W>, W) : launch(swiglu_backward_kernel<T, 1>, 1);
  });
  check_launch("swiglu_backward");
}

void moe_swiglu_forward(Dtype dt,
                        const void* gu,
                        const void* dg,
                        const void* du,
                        const void* w,
                        void* mixed,
                        void* slots,
                        const SlotsShape& shape,
                        Stream stream) {
  if (shape.rows * shape.cols == 0) return;
  dispatch(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using Acc = typename Num<T>::Acc;
    constexpr int W = kWide<T>;
    const bool wide = rows_aligned({gu, dg, du, mixed, slots}, shape.cols, sizeof(T));
    auto launch = [&](auto kernel) {
      kernel<<<shape.rows, kBlock, 0, stream>>>(
          static_cast<const T*>(gu), static_cast<const T*>(dg), static_cast<const T*>(du),
          static_cast<const Acc*>(w), static_cast<T*>(mixed), static_cast<T*>(slots), shape.cols,
          static_cast<int>(shape.k));
    };
    wide ? launch(moe_swiglu_forward_kernel<T, W>) : launch(moe_swiglu_forward_kernel<T, 1>);
  });
  check_launch("moe_swiglu_forward");
}

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
                         Stream stream) {
  if (shape.rows * shape.cols == 0) return;
  dispatch(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using Acc = typename Num<T>::Acc;
    constexpr int W = kWide<T>;
    const bool wide =
        rows_aligned({dmixed, dslots, gu, dg, du, dgu, ddg, ddu}, shape.cols, sizeof(T));
    auto launch = [&](auto kernel) {
      kernel<<<shape.rows, kBlock, 0, stream>>>(
          static_cast<const T*>(dmixed), static_cast<const T*>(dslots), static_cast<const T*>(gu),
          static_cast<const T*>(dg), static_cast<const T*>(du), static_cast<const Acc*>(w),
          static_cast<T*>(dgu), static_cast<T*>(ddg), static_cast<T*>(ddu), static_cast<Acc*>(dw),
          shape.cols, static_cast<int>(shape.k));
    };
    wide ? launch(moe_swiglu_backward_kernel<T, W>) : launch(moe_swiglu_backward_kernel<T, 1>);
  });
  check_launch("moe_swiglu_backward");
}

void target_log_softmax(Dtype dt,
                        void* logits,
                        const int64_t* targets,
                        void* logp,
                        int64_t n,
                        int64_t vocab,
                        bool grad,
                        Stream stream) {
  if (n == 0) return;
  dispatch(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using Acc = typename Num<T>::Acc;
    auto launch = [&](auto kernel) {
      kernel<<<n, kBlock, 0, stream>>>(static_cast<T*>(logits), targets, static_cast<Acc*>(logp),
                                       vocab, grad);
    };
    aligned(logits, vocab, vocab, sizeof(T)) ? launch(target_log_softmax_kernel<T, kWide<T>>)
                                             : launch(target_log_softmax_kernel<T, 1>);
  });
  check_launch("target_log_softmax");
}

void rope(Dtype dt,
          const void* x,
          const RopeShape& shape,
          const void* cos,
          const void* sin,
          void* y,
          bool inverse,
          Stream stream) {
  const int64_t half = shape.d / 2;
  if (shape.b * shape.h * shape.t * half == 0) return;
  dispatch(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int W = kWide<T>;
    // Every row start and the half-way point (so also each table row, D = 2 half) must sit on a
    // 16-byte boundary.
    const bool wide = half % W == 0 && heads_aligned(shape, sizeof(T), {x, cos, sin, y});
    auto launch = [&](auto kernel, int per) {
      kernel<<<grid_for(shape.b * shape.h * shape.t * half / per), kBlock, 0, stream>>>(
          static_cast<const T*>(x), shape, static_cast<const T*>(cos), static_cast<const T*>(sin),
          static_cast<T*>(y), inverse);
    };
    wide ? launch(rope_kernel<T, W>, W) : launch(rope_kernel<T, 1>, 1);
  });
  check_launch("rope");
}

void copy_heads(Dtype dt, const void* x, const RopeShape& shape, void* y, Stream stream) {
  const int64_t n = shape.b * shape.h * shape.t * shape.d;
  if (n == 0) return;
  dispatch(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int W = kWide<T>;
    const bool wide = shape.d % W == 0 && heads_aligned(shape, sizeof(T), {x, y});
    auto launch = [&](auto kernel, int per) {
      kernel<<<grid_for(n / per), kBlock, 0, stream>>>(static_cast<const T*>(x), shape,
                                                       static_cast<T*>(y));
    };
    wide ? launch(copy_heads_kernel<T, W>, W) : launch(copy_heads_kernel<T, 1>, 1);
  });
  check_launch("copy_heads");
}

void nf4_dequantize(Dtype dt,
                    const uint8_t* packed,
                    const uint8_t* absmax_codes,
                    const float* absmax_scale,
                    const float* offset,
                    const float* dynamic_map,
                    void* out,
                    int64_t n,
                    Stream stream) {
  if (n == 0) return;
  dispatch(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int W = 32;
    const bool wide = n % W == 0 && reinterpret_cast<uintptr_t>(out) % alignof(Pack<T, 8>) == 0 &&
                      reinterpret_cast<uintptr_t>(packed) % 16 == 0;
    Nf4Table codes;
    for (int c = 0; c < 16; ++c) codes.v[c] = kNf4Values[c];
    auto launch = [&](auto kernel, int per) {
      kernel<<<grid_for((n + per - 1) / per), kBlock, 0, stream>>>(
          packed, absmax_codes, absmax_scale, offset, dynamic_map, codes, static_cast<T*>(out), n);
    };
    wide ? launch(nf4_dequantize_kernel<T, W>, W) : launch(nf4_dequantize_kernel<T, 1>, 1);
  });
  check_launch("nf4_dequantize");
}

void adamw_grad_sq(const AdamWTensor* tensors,
                   const AdamWChunk* chunks,
                   int64_t n_chunks,
                   float* partials,
                   unsigned* done,
                   float* sq,
                   Stream stream) {
  if (n_chunks == 0) return;
  adamw_grad_sq_kernel<<<static_cast<unsigned>(n_chunks), kBlock, 0, stream>>>(tensors, chunks,
                                                                               partials, done, sq);
  check_launch("adamw_grad_sq");
}

void adamw_update(const AdamWTensor* tensors,
                  const AdamWChunk* chunks,
                  int64_t n_chunks,
                  const float* sq,
                  const AdamWScalars& s,
                  Stream stream) {
  if (n_chunks == 0) return;
  adamw_update_kernel<<<static_cast<unsigned>(n_chunks), kBlock, 0, stream>>>(tensors, chunks, sq,
                                                                              s);
  check_launch("adamw_update");
}

}  // namespace lorafit::kernels
