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
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <torch/cuda.h>
#endif

#include <cmath>

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

/// Each KV head serving heads/kv_heads consecutive query heads, as transformers' repeat_kv.
/// x: [B, KV, T, D] -> [B, H, T, D]
inline torch::Tensor repeat_kv(const torch::Tensor& x, int64_t heads) {
  const auto b = x.size(0), kv = x.size(1), t = x.size(2), d = x.size(3);
  if (kv == heads) return x;
  return x.unsqueeze(2).expand({b, kv, heads / kv, t, d}).reshape({b, heads, t, d});
}

/// Causal self-attention with grouped KV heads, where query i sits at position offset + i and
/// sees keys 0 .. offset + i (the keys before it are a KV cache).
/// q: [B, H, Tq, D], k, v: [B, KV, Tk, D] with Tk = offset + Tq; returns [B, H, Tq, D].
inline torch::Tensor causal_attention(const torch::Tensor& q,
                                      const torch::Tensor& k,
                                      const torch::Tensor& v,
                                      double scale,
                                      int64_t offset = 0) {
  const auto heads = q.size(1), tq = q.size(-2), tk = k.size(-2);
  // SDPA's is_causal aligns queries with the first keys, right only when there is no cache; a
  // single new query sees every key and needs no mask; anything else gets an explicit one.
  torch::Tensor mask;  // [Tq, Tk] bool, true where attending is allowed
  if (offset > 0 && tq > 1) {
    auto qpos = torch::arange(offset, offset + tq, torch::dtype(torch::kInt64).device(q.device()));
    mask = qpos.unsqueeze(1) >=
           torch::arange(tk, torch::dtype(torch::kInt64).device(q.device())).unsqueeze(0);
  }
  const bool causal = offset == 0 && tq > 1;
#if TORCH_VERSION_MAJOR >= 2
  // SDPA picks flash attention on CUDA for bf16/f16. Flash alone reads grouped KV heads in
  // place (enable_gqa); any other backend would fall back to the slow math kernel with it, so
  // the heads are expanded there instead.
  const bool flash_gqa =
      k.size(1) != heads && q.is_cuda() && !mask.defined() && q.size(-1) <= 256 &&
      (q.scalar_type() == torch::kBFloat16 || q.scalar_type() == torch::kFloat16);
  const auto kk = flash_gqa ? k : repeat_kv(k, heads), vv = flash_gqa ? v : repeat_kv(v, heads);
  return at::scaled_dot_product_attention(
      q, kk, vv, mask.defined() ? c10::optional<torch::Tensor>(mask) : c10::nullopt,
      /*dropout_p=*/0.0, causal, scale, flash_gqa);
#else
  // LibTorch 1.13 has no public SDPA: the math path SDPA itself falls back to.
  auto scores = torch::matmul(q, repeat_kv(k, heads).transpose(-2, -1)) * scale;  // [B, H, Tq, Tk]
  if (causal) mask = torch::ones({tq, tk}, torch::dtype(torch::kBool).device(q.device())).tril();
  if (mask.defined())
    scores = scores.masked_fill(mask.logical_not(), -std::numeric_limits<float>::infinity());
  return torch::matmul(torch::softmax(scores, -1), repeat_kv(v, heads));
#endif
}

/// Attention of every query over the keys `mask` allows ([Tq, Tk] or broadcastable to
/// [B, H, Tq, Tk], bool, true where allowed; every query must be allowed some key).
/// q, k, v: [B, H, T, D] with as many heads each.
inline torch::Tensor masked_attention(const torch::Tensor& q,
                                      const torch::Tensor& k,
                                      const torch::Tensor& v,
                                      const torch::Tensor& mask,
                                      double scale) {
#if TORCH_VERSION_MAJOR >= 2
  return at::scaled_dot_product_attention(q, k, v, mask, 0.0, false, scale);
#else
  auto scores = torch::matmul(q, k.transpose(-2, -1)) * scale;  // [B, H, Tq, Tk]
  scores = scores.masked_fill(mask.logical_not(), -std::numeric_limits<float>::infinity());
  return torch::matmul(torch::softmax(scores, -1), v);
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

/// The random state that dropout on `device` draws from, and setting it back (activation
/// checkpointing replays it).
inline torch::Tensor rng_state(torch::Device device) {
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
inline void foreach_scale_(std::vector<torch::Tensor>& tensors, const torch::Tensor& factor) {
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
