// DoRA (arXiv 2402.09353) with PEFT's math (LoraConfig(use_dora=True)): a LoRA whose
// projection output is rescaled, output channel by channel, to a trained magnitude m over the
// norm of the LoRA-updated weight,
//   y = g * (x W^T + s x A^T B^T) (+ bias),  g = m / ||W + s B A||_row,
// the norm taken as a constant (detached, as the paper's section 4.3 and PEFT do). m starts at
// ||W||_row, so with B = 0 the projection starts as the base. With dropout in training the
// base term keeps the undropped input, as PEFT computes it:
//   y = x W^T + (g - 1) * d(x) W^T + g * s * d(x) A^T B^T.
// On disk: PEFT's LoRA format with "use_dora": true and a tensor
// base_model.model.<module>.lora_magnitude_vector [out] (fp32) beside lora_A and lora_B.
#pragma once

#include "adapters/lora.h"
#include "adapters/strategy.h"

namespace lorafit {

struct DoraImpl : LoraImpl {
  /// A fresh DoRA on `projection`: LoRA's init (B = 0) and m = ||W||_row.
  DoraImpl(const ProjectionImpl& projection, int64_t r, double scaling, double dropout);
  /// The LoRA term with g as its output scale; std::nullopt in training with dropout, where
  /// forward computes PEFT's dropout form.
  std::optional<LowRank> low_rank() const override;
  /// x: [..., in], base: [..., out] = x W^T -> [..., out]
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& base) override;
  /// g * (W + s B A) - W, in fp32.
  torch::Tensor merged_delta() const override;
  /// g = m / ||W + s B A||_row: differentiable in m only. [out], in fp32 (or wider)
  torch::Tensor column_scale() const;
  /// ||W + s B A||_row without a graph and without forming W + s B A: ||W||^2 (kept while W
  /// is unchanged) + 2s (B . W A^T) + s^2 (B . B A A^T) row by row, so that a step reads W
  /// once, in its own dtype. [out], in fp32 (or wider)
  torch::Tensor updated_norms() const;
  /// ||W||^2 row by row, computed again only when W changes (a COLA knot, a load). [out]
  const torch::Tensor& weight_norms_sq() const;

  /// W [out, in] in `dtype`: the dense weight, or the quantized one dequantized for this use.
  torch::Tensor frozen(torch::ScalarType dtype) const { return base.materialize(dtype); }

  BaseWeight base;                      // [out, in] the projection's frozen weight (not ours)
  torch::Tensor lora_magnitude_vector;  // [out] fp32
  mutable torch::Tensor weight_sq;      // [out] ||W||^2 row by row, for weight_version
  mutable int64_t weight_version = -1;
  mutable const void* weight_data = nullptr;
};
TORCH_MODULE(Dora);

/// DoRA's row of the strategy table: PEFT's peft_type LORA with use_dora true. Not chained by
/// COLA (its update is a rescaling, not low-rank factors).
AdapterSpec dora_strategy();

}  // namespace lorafit
