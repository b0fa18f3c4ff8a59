// QLoRA's frozen base: a weight stored in 4-bit NormalFloat (NF4) as bitsandbytes stores it
// with `bnb_4bit_quant_type="nf4"` and `bnb_4bit_use_double_quant=True`: blocks of 64 weights,
// each scaled by its absmax into [-1, 1] and rounded to the nearest of 16 code values, two codes
// a byte; the block absmaxes, less their mean, in 8 bits (bitsandbytes' dynamic map) with one
// fp32 scale per 256 of them. Dequantization is value = code[c] * absmax in fp32, rounded once
// to the compute dtype: a CUDA kernel on the GPU, LibTorch ops elsewhere, the same bits.
#pragma once

#include <torch/torch.h>

#include <array>
#include <string>

namespace lorafit {

constexpr int64_t kNf4Block = 64;         // weights per absmax
constexpr int64_t kNf4AbsmaxBlock = 256;  // absmaxes per fp32 scale (double quantization)

/// How the frozen base's projection weights are stored: as loaded, or in NF4 (QLoRA).
enum class Quantize { None, Nf4 };

/// "none" or "nf4"; a ConfigError naming `key` and the choices otherwise.
Quantize parse_quantize(const std::string& value, const std::string& key);

/// The 16 NF4 values, ascending (bitsandbytes' table: normal quantiles scaled to [-1, 1],
/// with an exact 0).
const std::array<float, 16>& nf4_codebook();

/// bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True)), the code of the
/// double-quantized absmaxes: 256 values ascending in [-1, 1], on the CPU in fp32.
torch::Tensor dynamic_map();

/// One weight [rows, cols] in NF4, every tensor on the weight's device.
struct Nf4Weight {
  torch::Tensor packed;        // [ceil(rows * cols / 2)] uint8: element 2i high nibble, 2i+1 low
  torch::Tensor absmax;        // [blocks] uint8: dynamic-map codes of (absmax - offset) / scale
  torch::Tensor absmax_scale;  // [ceil(blocks / 256)] f32: each 256 absmaxes' own absmax
  torch::Tensor offset;        // [1] f32: the mean of the block absmaxes
  int64_t rows = 0, cols = 0;

  bool defined() const { return packed.defined(); }
  int64_t blocks() const { return (rows * cols + kNf4Block - 1) / kNf4Block; }
  /// The bytes it occupies on its device.
  int64_t bytes() const;
};

/// w: [rows, cols] any floating dtype, quantized where it lives (through fp32).
Nf4Weight nf4_quantize(const torch::Tensor& w);

/// The decoded block absmaxes [blocks] f32: code2[absmax] * scale[block / 256] + offset.
torch::Tensor nf4_absmax(const Nf4Weight& q);

/// Writes the weight into `out` [rows, cols] (contiguous rows; f32, f64, bf16 or f16): the CUDA
/// kernel for a CUDA tensor unless LORAFIT_KERNELS=0, otherwise the composite below.
void nf4_dequantize_into(const Nf4Weight& q, torch::Tensor out);

/// The weight [rows, cols] in `dtype`, freshly allocated.
torch::Tensor nf4_dequantize(const Nf4Weight& q, torch::ScalarType dtype);

namespace composite {
/// The dequantization as LibTorch ops, which the kernel is tested against.
void nf4_dequantize_into(const Nf4Weight& q, torch::Tensor out);
}  // namespace composite

}  // namespace lorafit
