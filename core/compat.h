// The one place where LibTorch 1.13 (Debian, CPU) and LibTorch 2.x (CUDA) differ for lorafit.
#pragma once

#include <torch/torch.h>
#include <torch/version.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <filesystem>

namespace lorafit::compat {

/// Causal self-attention over heads of equal count (GQA already expanded).
/// q, k, v: [B, H, T, D]; returns [B, H, T, D].
inline torch::Tensor causal_attention(const torch::Tensor& q, const torch::Tensor& k,
                                      const torch::Tensor& v, double scale) {
#if TORCH_VERSION_MAJOR >= 2
  // SDPA picks flash attention on CUDA for bf16/f16 inputs.
  return at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/{}, /*dropout_p=*/0.0,
                                          /*is_causal=*/true, scale);
#else
  // LibTorch 1.13 has no public SDPA: the math path SDPA itself falls back to.
  const auto t = q.size(-2);
  auto scores = torch::matmul(q, k.transpose(-2, -1)) * scale;  // [B, H, T, T]
  auto future = torch::ones({t, t}, torch::dtype(torch::kBool).device(q.device())).triu(1);
  scores = scores.masked_fill(future, -std::numeric_limits<float>::infinity());
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

/// Removes a file or a folder with everything in it. The pip LibTorch (2.x) exports its own
/// copy of std::filesystem::remove_all, which programs linked against it bind to and which
/// crashes on any non-empty folder; this walks the tree with the calls that work in both.
inline void remove_tree(const std::filesystem::path& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(std::filesystem::symlink_status(path, ec))) {
    for (const auto& entry : std::filesystem::directory_iterator(path, ec)) remove_tree(entry.path());
  }
  std::filesystem::remove(path, ec);
}

}  // namespace lorafit::compat
