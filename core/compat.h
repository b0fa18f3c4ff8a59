// The one place where LibTorch 1.13 (Debian, CPU) and LibTorch 2.x (CUDA) differ for lorafit.
#pragma once

#include <ATen/CPUGeneratorImpl.h>
#include <sys/resource.h>
#include <torch/torch.h>
#include <torch/version.h>
#if TORCH_VERSION_MAJOR >= 2
#include <torch/csrc/autograd/profiler_kineto.h>
#endif
#ifdef LORAFIT_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/cuda.h>
#endif

#include <array>
#include <cmath>
#include <functional>
#include <memory>
#include <stdexcept>
#include <vector>

namespace c10d {
class Backend;
class ProcessGroup;
}  // namespace c10d

namespace lorafit::compat {

/// What c10d's backends (ProcessGroupGloo, ProcessGroupNCCL) derive from.
#if TORCH_VERSION_MAJOR >= 2
using CollectiveBackend = c10d::Backend;
#else
using CollectiveBackend = c10d::ProcessGroup;
#endif

/// Scaled dot-product attention: LibTorch 2.x's fused SDPA (flash on CUDA where it can; with
/// `grouped_kv`, k and v may have fewer heads than q, which flash reads in place), or on 1.13,
/// which has no public SDPA, the math path SDPA itself falls back to. mask: bool, true where
/// attending is allowed, broadcastable to [B, H, Tq, Tk], or undefined; causal: queries aligned
/// with the first keys. q: [B, H, Tq, D], k, v: [B, H or KV, Tk, D] -> [B, H, Tq, D]
inline torch::Tensor sdpa(const torch::Tensor& q,
                          const torch::Tensor& k,
                          const torch::Tensor& v,
                          const torch::Tensor& mask,
                          bool causal,
                          double scale,
                          bool grouped_kv = false) {
#if TORCH_VERSION_MAJOR >= 2
  return at::scaled_dot_product_attention(
      q, k, v, mask.defined() ? c10::optional<torch::Tensor>(mask) : c10::nullopt,
      /*dropout_p=*/0.0, causal, scale, grouped_kv);
#else
  TORCH_CHECK(!grouped_kv || k.size(1) == q.size(1), "sdpa: grouped KV heads need LibTorch 2.x");
  auto scores = torch::matmul(q, k.transpose(-2, -1)) * scale;  // [B, H, Tq, Tk]
  auto allowed = mask;
  if (causal) {
    allowed =
        torch::ones({q.size(-2), k.size(-2)}, torch::dtype(torch::kBool).device(q.device())).tril();
  }
  if (allowed.defined())
    scores = scores.masked_fill(allowed.logical_not(), -std::numeric_limits<float>::infinity());
  return torch::matmul(torch::softmax(scores, -1), v);
#endif
}

/// One fused attention forward's output and what its backward reads: the log-sum-exp of each
/// head and token, and the dropout RNG's seed and offset (unused, no dropout). Opaque beyond
/// `out`, whose shape tells the kernel: [B, H, T, D] cuDNN's (cudnn_causal), [N, H, D] flash's
/// (varlen_flash). Kept by a checkpointed layer so that its recomputation skips the forward.
struct AttentionState {
  torch::Tensor out;
  torch::Tensor lse, seed, offset;
  bool defined() const { return out.defined(); }
};

#if TORCH_VERSION_MAJOR >= 2 && defined(LORAFIT_WITH_CUDA)
namespace detail {
// A kept state as the attention Functions' last four arguments: empty tensors when nothing is
// kept (a Function's inputs are never undefined).
inline std::array<torch::Tensor, 4> state_args(const AttentionState& kept, const torch::Tensor& q) {
  if (kept.defined()) return {kept.out, kept.lse, kept.seed, kept.offset};
  const auto none = torch::empty({0}, q.options());
  return {none, none, none, none};
}

inline AttentionState flash_forward(const torch::Tensor& q,
                                    const torch::Tensor& k,
                                    const torch::Tensor& v,
                                    const torch::Tensor& cu_seqlens,
                                    int64_t max_len,
                                    double scale) {
  const auto r = at::_flash_attention_forward(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len,
                                              /*dropout_p=*/0.0, /*is_causal=*/true,
                                              /*return_debug_mask=*/false, scale);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r)};
}

// Flash attention over variable-length sequences, forward and backward (no dropout). Given a
// forward's state (out non-empty), it returns that output instead of running the forward.
struct VarlenFlash : torch::autograd::Function<VarlenFlash> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx,
                               torch::Tensor q /*[N, H, D]*/,
                               torch::Tensor k /*[N, KV, D]*/,
                               torch::Tensor v /*[N, KV, D]*/,
                               torch::Tensor cu_seqlens /*[S + 1] int32*/,
                               int64_t max_len,
                               double scale,
                               torch::Tensor out /*[N, H, D], or empty*/,
                               torch::Tensor lse,
                               torch::Tensor seed,
                               torch::Tensor offset) {
    const auto st = out.numel() ? AttentionState{out, lse, seed, offset}
                                : flash_forward(q, k, v, cu_seqlens, max_len, scale);
    ctx->save_for_backward({q, k, v, st.out, st.lse, cu_seqlens, st.seed, st.offset});
    ctx->saved_data["max_len"] = max_len;
    ctx->saved_data["scale"] = scale;
    return st.out;
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto max_len = ctx->saved_data["max_len"].toInt();
    const auto d = at::_flash_attention_backward(
        grads[0].contiguous(), s[0], s[1], s[2], s[3], s[4], s[5], s[5], max_len, max_len,
        /*dropout_p=*/0.0, /*is_causal=*/true, s[6], s[7], ctx->saved_data["scale"].toDouble());
    torch::autograd::tensor_list out(10);
    out[0] = std::get<0>(d), out[1] = std::get<1>(d), out[2] = std::get<2>(d);
    return out;
  }
};

inline AttentionState cudnn_forward(const torch::Tensor& q,
                                    const torch::Tensor& k,
                                    const torch::Tensor& v,
                                    double scale) {
  const auto r = at::_scaled_dot_product_cudnn_attention(
      q, k, v, c10::nullopt, /*compute_log_sumexp=*/true, /*dropout_p=*/0.0,
      /*is_causal=*/true, /*return_debug_mask=*/false, scale);
  return {std::get<0>(r), std::get<1>(r), std::get<6>(r), std::get<7>(r)};
}

// cuDNN's causal attention over whole rows, forward and backward, as SDPA runs it; given a
// forward's state (out non-empty), it returns that output instead of running the forward.
struct CudnnCausal : torch::autograd::Function<CudnnCausal> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx,
                               torch::Tensor q /*[B, H, T, D]*/,
                               torch::Tensor k /*[B, KV, T, D]*/,
                               torch::Tensor v /*[B, KV, T, D]*/,
                               double scale,
                               torch::Tensor out /*[B, H, T, D], or empty*/,
                               torch::Tensor lse,
                               torch::Tensor seed,
                               torch::Tensor offset) {
    const auto st =
        out.numel() ? AttentionState{out, lse, seed, offset} : cudnn_forward(q, k, v, scale);
    ctx->save_for_backward({q, k, v, st.out, st.lse, st.seed, st.offset});
    ctx->saved_data["scale"] = scale;
    return st.out;
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto d = at::_scaled_dot_product_cudnn_attention_backward(
        grads[0], s[0], s[1], s[2], s[3], s[4], s[5], s[6], /*attn_bias=*/torch::Tensor(),
        /*cum_seq_q=*/torch::Tensor(), /*cum_seq_k=*/torch::Tensor(), s[0].size(2), s[1].size(2),
        /*dropout_p=*/0.0, /*is_causal=*/true, ctx->saved_data["scale"].toDouble());
    torch::autograd::tensor_list out(8);
    out[0] = std::get<0>(d), out[1] = std::get<1>(d), out[2] = std::get<2>(d);
    return out;
  }
};
}  // namespace detail
#endif

/// Whether SDPA runs cuDNN's fused kernel for causal attention over q, k, v (grouped KV heads
/// read in place): LibTorch 2.x picks it on Hopper for bf16. Then cudnn_causal computes what
/// SDPA does. q: [B, H, T, D], k, v: [B, KV, T, D]
inline bool sdpa_runs_cudnn(const torch::Tensor& q,
                            const torch::Tensor& k,
                            const torch::Tensor& v,
                            double scale) {
#if TORCH_VERSION_MAJOR >= 2 && defined(LORAFIT_WITH_CUDA)
  constexpr int64_t kCudnnAttention = 3;  // at::SDPBackend::cudnn_attention
  return q.is_cuda() &&
         at::_fused_sdp_choice(q, k, v, c10::nullopt, /*dropout_p=*/0.0,
                               /*is_causal=*/true, scale,
                               /*enable_gqa=*/k.size(1) != q.size(1)) == kCudnnAttention;
#else
  (void)q, (void)k, (void)v, (void)scale;
  return false;
#endif
}

/// cuDNN's causal attention, differentiable; with `kept`, the state of an earlier forward of
/// the same q, k, v (cudnn_causal_forward), the forward is not run again. Only where
/// sdpa_runs_cudnn. q: [B, H, T, D], k, v: [B, KV, T, D] -> [B, H, T, D]
inline torch::Tensor cudnn_causal(const torch::Tensor& q,
                                  const torch::Tensor& k,
                                  const torch::Tensor& v,
                                  double scale,
                                  const AttentionState& kept = {}) {
#if TORCH_VERSION_MAJOR >= 2 && defined(LORAFIT_WITH_CUDA)
  const auto st = detail::state_args(kept, q);
  return detail::CudnnCausal::apply(q, k, v, scale, st[0], st[1], st[2], st[3]);
#else
  (void)k, (void)v, (void)scale, (void)kept;
  TORCH_CHECK(false, "cudnn_causal: no cuDNN attention in this build, for ", q.device());
#endif
}

/// cudnn_causal's forward alone, not differentiable, with the state its backward reads.
inline AttentionState cudnn_causal_forward(const torch::Tensor& q,
                                           const torch::Tensor& k,
                                           const torch::Tensor& v,
                                           double scale) {
#if TORCH_VERSION_MAJOR >= 2 && defined(LORAFIT_WITH_CUDA)
  return detail::cudnn_forward(q, k, v, scale);
#else
  (void)k, (void)v, (void)scale;
  TORCH_CHECK(false, "cudnn_causal_forward: no cuDNN attention in this build, for ", q.device());
#endif
}

/// Whether varlen_flash runs for q: flash attention's variable-length kernels are LibTorch
/// 2.x's, on CUDA, for bf16/f16 and head sizes up to 256.
inline bool has_varlen_flash(const torch::Tensor& q) {
#if TORCH_VERSION_MAJOR >= 2 && defined(LORAFIT_WITH_CUDA)
  const auto t = q.scalar_type();
  return q.is_cuda() && (t == torch::kBFloat16 || t == torch::kFloat16) && q.size(-1) <= 256 &&
         q.size(-1) % 8 == 0;
#else
  (void)q;
  return false;
#endif
}

/// Causal attention within each of the sequences that cu_seqlens ([S + 1] int32, starting at
/// 0) cuts the N tokens into, differentiable; k and v may have fewer heads (grouped KV). With
/// `kept`, the state of an earlier forward of the same q, k, v (varlen_flash_forward), the
/// forward is not run again. Only where has_varlen_flash(q). q: [N, H, D], k, v: [N, KV, D]
/// -> [N, H, D]
inline torch::Tensor varlen_flash(const torch::Tensor& q,
                                  const torch::Tensor& k,
                                  const torch::Tensor& v,
                                  const torch::Tensor& cu_seqlens,
                                  int64_t max_len,
                                  double scale,
                                  const AttentionState& kept = {}) {
#if TORCH_VERSION_MAJOR >= 2 && defined(LORAFIT_WITH_CUDA)
  const auto st = detail::state_args(kept, q);
  return detail::VarlenFlash::apply(q, k, v, cu_seqlens, max_len, scale, st[0], st[1], st[2],
                                    st[3]);
#else
  (void)k, (void)v, (void)cu_seqlens, (void)max_len, (void)scale, (void)kept;
  TORCH_CHECK(false, "varlen_flash: no flash attention in this build, for ", q.device());
#endif
}

/// varlen_flash's forward alone, not differentiable, with the state its backward reads.
inline AttentionState varlen_flash_forward(const torch::Tensor& q,
                                           const torch::Tensor& k,
                                           const torch::Tensor& v,
                                           const torch::Tensor& cu_seqlens,
                                           int64_t max_len,
                                           double scale) {
#if TORCH_VERSION_MAJOR >= 2 && defined(LORAFIT_WITH_CUDA)
  return detail::flash_forward(q, k, v, cu_seqlens, max_len, scale);
#else
  (void)k, (void)v, (void)cu_seqlens, (void)max_len, (void)scale;
  TORCH_CHECK(false, "varlen_flash_forward: no flash attention in this build, for ", q.device());
#endif
}

/// The CPU generator's state (dropout's randomness), for checkpoints.
inline torch::Tensor cpu_rng_state() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

inline void set_cpu_rng_state(const torch::Tensor& state) {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

/// Whether work queued now on `device`'s current stream is being captured into a CUDA graph
/// (recorded to be replayed, not run): never on the CPU.
inline bool capturing(torch::Device device) {
#ifdef LORAFIT_WITH_CUDA
  return device.is_cuda() &&
         c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
#else
  (void)device;
  return false;
#endif
}

/// CUDA graphs that share one side stream and one private memory pool: they never run at once,
/// and what one leaves allocated (its outputs) no other reuses. LibTorch with CUDA only; the
/// constructor throws elsewhere.
class GraphSet {
 public:
  explicit GraphSet(torch::Device device) {
#ifdef LORAFIT_WITH_CUDA
    if (device.is_cuda()) {
      stream_ = std::make_unique<c10::cuda::CUDAStream>(
          c10::cuda::getStreamFromPool(false, device.index() < 0 ? 0 : device.index()));
      pool_ = at::cuda::graph_pool_handle();
      return;
    }
#endif
    throw std::runtime_error("CUDA graphs need a CUDA device and LibTorch with CUDA (here: " +
                             device.str() + ", LibTorch " TORCH_VERSION ")");
  }

  /// Records what `body` queues (none of it runs) as a graph; -> its index for `replay`.
  size_t capture(const std::function<void()>& body) {
#ifdef LORAFIT_WITH_CUDA
    // The cached blocks of eager passes (the warm-up's) serve no graph: back to the device
    // before the capture fills its pool, so that the process never holds both.
    c10::cuda::CUDACachingAllocator::emptyCache();
    graphs_.push_back(std::make_unique<at::cuda::CUDAGraph>());
    auto& graph = *graphs_.back();
    run([&] {
      graph.capture_begin(pool_);
      try {
        body();
      } catch (...) {
        try {
          graph.capture_end();
        } catch (...) {  // the capture is void already: the body's error is the one to report
        }
        graphs_.pop_back();
        throw;
      }
      graph.capture_end();
    });
#else
    (void)body;
#endif
    return graphs_.size() - 1;
  }

  /// Queues graph `g`'s work on the current stream.
  void replay(size_t g) {
#ifdef LORAFIT_WITH_CUDA
    graphs_.at(g)->replay();
#else
    (void)g;
#endif
  }

  size_t size() const {
    return graphs_.size();
  }

  /// Runs `body` on the side stream, after the work queued on the current stream and before
  /// what it queues next (a capture, or the eager pass that warms a graph's kernels and
  /// workspaces up outside one).
  void run(const std::function<void()>& body) {
#ifdef LORAFIT_WITH_CUDA
    const auto current = c10::cuda::getCurrentCUDAStream(stream_->device_index());
    at::cuda::CUDAEvent before, after;
    before.record(current);
    before.block(*stream_);
    {
      const c10::cuda::CUDAStreamGuard guard(*stream_);
      body();
    }
    after.record(*stream_);
    after.block(current);
#else
    body();
#endif
  }

 private:
#ifdef LORAFIT_WITH_CUDA
  std::unique_ptr<c10::cuda::CUDAStream> stream_;
  at::cuda::MempoolId_t pool_;
  std::vector<std::unique_ptr<at::cuda::CUDAGraph>> graphs_;
#else
  std::vector<int> graphs_;
#endif
};

/// The random state that dropout on `device` draws from, and setting it back (activation
/// checkpointing replays it). Undefined while a CUDA graph is being captured, where the
/// generator's offset cannot be read (graphs are refused where a recomputation would replay
/// dropout), and setting an undefined state does nothing.
inline torch::Tensor rng_state(torch::Device device) {
  if (capturing(device)) return {};
#ifdef LORAFIT_WITH_CUDA
  if (device.is_cuda()) {
    auto gen = at::cuda::detail::getDefaultCUDAGenerator(device.index() < 0 ? 0 : device.index());
    std::lock_guard<std::mutex> lock(gen.mutex());
    return gen.get_state();
  }
#endif
  return cpu_rng_state();
}

inline void set_rng_state(torch::Device device, const torch::Tensor& state) {
  if (!state.defined()) return;
#ifdef LORAFIT_WITH_CUDA
  if (device.is_cuda()) {
    auto gen = at::cuda::detail::getDefaultCUDAGenerator(device.index() < 0 ? 0 : device.index());
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(state);
    return;
  }
#endif
  set_cpu_rng_state(state);
}

/// Peak memory that tensors on `device` have held since the last reset, in GiB: the CUDA
/// caching allocator's peak on a GPU, the process's peak resident set on the CPU.
inline double peak_memory_gib(torch::Device device) {
#ifdef LORAFIT_WITH_CUDA
  if (device.is_cuda()) {
    const auto stats =
        c10::cuda::CUDACachingAllocator::getDeviceStats(device.index() < 0 ? 0 : device.index());
    return static_cast<double>(stats.allocated_bytes[0].peak) / (1 << 30);  // [0]: all pools
  }
#endif
  struct rusage usage {};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) / (1 << 20);  // KiB
}

/// The most memory the CUDA caching allocator has held from the device since the last reset,
/// in GiB (what the process takes beyond its CUDA context); 0 on the CPU.
inline double peak_reserved_gib(torch::Device device) {
#ifdef LORAFIT_WITH_CUDA
  if (device.is_cuda()) {
    const auto stats =
        c10::cuda::CUDACachingAllocator::getDeviceStats(device.index() < 0 ? 0 : device.index());
    return static_cast<double>(stats.reserved_bytes[0].peak) / (1 << 30);
  }
#endif
  (void)device;
  return 0.0;
}

inline void reset_peak_memory(torch::Device device) {
#ifdef LORAFIT_WITH_CUDA
  if (device.is_cuda())
    c10::cuda::CUDACachingAllocator::resetPeakStats(device.index() < 0 ? 0 : device.index());
#endif
}

/// Makes `device` the current CUDA device (a data-parallel rank's GPU); nothing on the CPU.
inline void use_cuda_device(torch::Device device) {
#ifdef LORAFIT_WITH_CUDA
  if (device.is_cuda()) c10::cuda::set_device(device.index());
#endif
}

inline void synchronize(torch::Device device) {
#ifdef LORAFIT_WITH_CUDA
  if (device.is_cuda()) torch::cuda::synchronize();
#endif
}

/// Multiplies every tensor in place by a 0-dim tensor without reading it on the host (2.x has
/// the multi-tensor overload; 1.13, CPU only here, reads the value).
inline void foreach_scale_(const std::vector<torch::Tensor>& tensors, const torch::Tensor& factor) {
#if TORCH_VERSION_MAJOR >= 2
  at::_foreach_mul_(tensors, factor);
#else
  at::_foreach_mul_(tensors, factor.item<double>());
#endif
}

/// Records CPU ops and CUDA kernels from `profile_start` until `profile_stop`, which writes them
/// as a Chrome trace (chrome://tracing, Perfetto). Kineto's C++ entry points are LibTorch 2.x's.
inline void profile_start() {
#if TORCH_VERSION_MAJOR >= 2
  namespace prof = torch::autograd::profiler;
  const prof::ProfilerConfig config(prof::ProfilerState::KINETO);
  const std::set<torch::profiler::impl::ActivityType> activities{
      torch::profiler::impl::ActivityType::CPU, torch::profiler::impl::ActivityType::CUDA};
  prof::prepareProfiler(config, activities);
  prof::enableProfiler(config, activities);
#else
  throw std::runtime_error("profiling needs LibTorch 2.x (this build has " TORCH_VERSION ")");
#endif
}

inline void profile_stop(const std::string& trace_path) {
#if TORCH_VERSION_MAJOR >= 2
  torch::autograd::profiler::disableProfiler()->save(trace_path);
#else
  (void)trace_path;
#endif
}

}  // namespace lorafit::compat
