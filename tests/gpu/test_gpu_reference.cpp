// On a CUDA machine: a Llama-3.2-1B-shaped checkpoint written by transformers
// (scripts/gpu_reference.py), loaded in bf16, must give transformers' bf16 logits within bf16
// noise; loading speed is printed. LORAFIT_GPU_REFERENCE names the script's output folder.
#include <fmt/core.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstdlib>

#include "core/llama.h"
#include "core/safetensors.h"
#include "test_util.h"

using namespace lorafit;

TEST_CASE("bf16 logits of a Llama-3.2-1B shape agree with transformers' on CUDA", "[gpu]") {
  REQUIRE(torch::cuda::is_available());
  const char* dir = std::getenv("LORAFIT_GPU_REFERENCE");
  REQUIRE(dir != nullptr);
  const std::string model_dir = std::string(dir) + "/model";

  torch::cuda::synchronize();
  const auto t0 = std::chrono::steady_clock::now();
  auto model = load_llama(model_dir, torch::kCUDA, torch::kBFloat16);
  torch::cuda::synchronize();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double gb = SafetensorsCheckpoint(model_dir).data_bytes() / 1e9;
  fmt::print("load: {:.2f} GB in {:.2f} s = {:.2f} GB/s\n", gb, seconds, gb / seconds);

  SafetensorsFile ref(std::string(dir) + "/reference.safetensors");
  const auto ids = ref.tensor("input_ids").to(torch::kCUDA);        // [B, T]
  const auto positions = ref.tensor("positions").to(torch::kCUDA);  // [P]
  const auto hf_bf16 = ref.tensor("logits_bf16").to(torch::kCUDA);  // [B, P, V]
  const auto hf_f32 = ref.tensor("logits_f32").to(torch::kCUDA);    // [B, P, V]
  torch::NoGradGuard no_grad;
  auto hidden = model->forward(ids).index_select(1, positions);
  auto ours = model->logits(hidden).to(torch::kFloat32);  // [B, P, V]

  auto rel = [](const torch::Tensor& a, const torch::Tensor& b) {
    return ((a - b).norm() / b.norm()).item<double>();
  };
  const double ours_vs_f32 = rel(ours, hf_f32);
  const double hf_vs_f32 = rel(hf_bf16, hf_f32);
  const double ours_vs_hf = rel(ours, hf_bf16);
  const double argmax_agree =
      ours.argmax(-1).eq(hf_bf16.argmax(-1)).to(torch::kFloat32).mean().item<double>();
  fmt::print(
      "relative L2 error: lorafit bf16 vs fp32 {:.4f}, transformers bf16 vs fp32 {:.4f}, "
      "lorafit vs transformers bf16 {:.4f}; argmax agreement {:.3f}\n",
      ours_vs_f32, hf_vs_f32, ours_vs_hf, argmax_agree);
  // Within bf16 noise: no further from the fp32 truth than transformers' own bf16 run.
  REQUIRE(ours_vs_f32 < 1.25 * hf_vs_f32 + 1e-3);
  REQUIRE(ours_vs_hf < 3e-2);
}
