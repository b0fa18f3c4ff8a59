// Where and in what precision the frozen base lives.
#pragma once

#include <torch/torch.h>

#include <string>

#include "core/errors.h"

namespace lorafit {

/// "auto" picks CUDA when LibTorch sees a GPU.
inline torch::Device pick_device(const std::string& name) {
  if (name == "cpu") return torch::kCPU;
  if (name == "cuda") {
    if (!torch::cuda::is_available()) {
      throw ConfigError(
          "--device cuda: no CUDA device is visible to LibTorch (hint: --device cpu)");
    }
    return torch::kCUDA;
  }
  if (name == "auto") return torch::cuda::is_available() ? torch::kCUDA : torch::kCPU;
  throw ConfigError("device '" + name + "' is not one of auto, cpu, cuda");
}

/// "auto" is bf16 on CUDA and f32 on the CPU.
inline torch::Dtype pick_dtype(const std::string& name, torch::Device device) {
  if (name == "bf16") return torch::kBFloat16;
  if (name == "f16") return torch::kFloat16;
  if (name == "f32") return torch::kFloat32;
  if (name == "auto") return device.is_cuda() ? torch::kBFloat16 : torch::kFloat32;
  throw ConfigError("dtype '" + name + "' is not one of auto, bf16, f16, f32");
}

}  // namespace lorafit
