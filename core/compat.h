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
