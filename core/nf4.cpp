#include "core/nf4.h"

#include <map>
#include <mutex>

#include "core/errors.h"
#include "core/fused_ops.h"
#include "core/kernels.h"

namespace lorafit {

Quantize parse_quantize(const std::string& value, const std::string& key) {
  if (value == "none") return Quantize::None;
  if (value == "nf4") return Quantize::Nf4;
  throw ConfigError(key + ": unknown value '" + value +
                    "', expected none or nf4 (hint: nf4 is QLoRA's 4-bit NormalFloat)");
}

const std::array<float, 16>& nf4_codebook() {
  static const std::array<float, 16> code = [] {
    std::array<float, 16> c{};
    std::copy(std::begin(kernels::kNf4Values), std::end(kernels::kNf4Values), c.begin());
    return c;
  }();
  return code;
}

torch::Tensor dynamic_map() {
  static const torch::Tensor map = [] {
    // Exponents 10^-6 .. 10^0, each with 2^i fraction steps (the midpoints of a linspace over
    // [0.1, 1]) on both signs: 254 values, then 0 and 1. The arithmetic is fp32, as
    // bitsandbytes' torch code runs it.
    std::vector<torch::Tensor> parts;
    for (int64_t i = 0; i < 7; ++i) {
      const auto bounds = torch::linspace(0.1, 1.0, (int64_t{1} << i) + 1, torch::kFloat32);
      const auto means =
          (bounds.narrow(0, 0, bounds.size(0) - 1) + bounds.narrow(0, 1, bounds.size(0) - 1)) / 2.0;
      const double scale = std::pow(10.0, static_cast<double>(i - 6));
      parts.push_back(means * scale);
      parts.push_back(means * -scale);
    }
    parts.push_back(torch::tensor({0.0f, 1.0f}));
    return std::get<0>(torch::cat(parts).sort());
  }();
  return map;
}

int64_t Nf4Weight::bytes() const {
  int64_t n = 0;
  for (const auto* t : {&packed, &absmax, &absmax_scale, &offset})
    n += t->numel() * t->element_size();
  return n;
}

namespace {

torch::Tensor nf4_table() {  // [16] f32 on the CPU
  return torch::tensor(std::vector<float>(nf4_codebook().begin(), nf4_codebook().end()));
}

// The midpoints between consecutive code values: a value's nearest code is the number of
// midpoints below it (ties to the lower code, as an argmin over the distances picks).
torch::Tensor midpoints(const torch::Tensor& code) {  // [K] -> [K - 1]
  const auto k = code.size(0);
  return (code.narrow(0, 0, k - 1) + code.narrow(0, 1, k - 1)) / 2;
}

// x: [n] f32 -> per block of `block` values its absmax [blocks] and the values scaled by its
// reciprocal into [-1, 1] ([blocks * block], zero-padded; a block of zeros stays zero).
std::pair<torch::Tensor, torch::Tensor> scale_blocks(const torch::Tensor& x, int64_t block) {
  const int64_t n = x.numel(), blocks = (n + block - 1) / block;
  const auto padded = torch::constant_pad_nd(x, {0, blocks * block - n}).view({blocks, block});
  const auto absmax = padded.abs().amax(1);  // [blocks]
  const auto inv = torch::where(absmax > 0, absmax.reciprocal(), torch::zeros_like(absmax));
  return {absmax, (padded * inv.unsqueeze(1)).clamp(-1, 1).view(-1)};
}

torch::Tensor nearest(const torch::Tensor& scaled, const torch::Tensor& code) {
  return torch::searchsorted(midpoints(code.to(scaled.device())), scaled, /*out_int32=*/true)
      .to(torch::kUInt8);
}

// The dynamic map on `device`, copied there once.
const torch::Tensor& dynamic_map_on(const torch::Device& device) {
  static std::mutex mutex;
  static std::map<std::string, torch::Tensor> copies;
  const std::lock_guard<std::mutex> lock(mutex);
  auto& t = copies[device.str()];
  if (!t.defined()) t = dynamic_map().to(device);
  return t;
}

}  // namespace

Nf4Weight nf4_quantize(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && torch::isFloatingType(w.scalar_type()),
              "nf4_quantize: a floating [rows, cols] weight");
  torch::NoGradGuard no_grad;
  Nf4Weight q;
  q.rows = w.size(0), q.cols = w.size(1);
  const int64_t n = w.numel();
  auto [absmax, scaled] = scale_blocks(w.reshape(-1).to(torch::kFloat32), kNf4Block);
  // An odd count takes one padding zero into its last byte, as bitsandbytes pads.
  const auto codes = nearest(scaled.narrow(0, 0, n + n % 2), nf4_table());
  const auto pairs = codes.view({-1, 2});
  q.packed = pairs.select(1, 0).bitwise_left_shift(4).bitwise_or(pairs.select(1, 1)).contiguous();
  // Double quantization: the absmaxes less their mean, in blocks of 256 on the dynamic map.
  q.offset = absmax.mean().reshape({1});
  auto [scale, scaled2] = scale_blocks(absmax - q.offset, kNf4AbsmaxBlock);
  q.absmax_scale = scale;
  q.absmax = nearest(scaled2.narrow(0, 0, absmax.size(0)), dynamic_map()).contiguous();
  return q;
}

torch::Tensor nf4_absmax(const Nf4Weight& q) {
  const auto& code2 = dynamic_map_on(q.absmax.device());
  const auto scale = q.absmax_scale.repeat_interleave(kNf4AbsmaxBlock).narrow(0, 0, q.blocks());
  return code2.index_select(0, q.absmax.to(torch::kInt64)) * scale + q.offset;
}

namespace composite {

void nf4_dequantize_into(const Nf4Weight& q, torch::Tensor out) {
  torch::NoGradGuard no_grad;
  const int64_t n = q.rows * q.cols;
  const auto codes = torch::stack({q.packed.bitwise_right_shift(4), q.packed.bitwise_and(15)}, 1)
                         .view(-1)
                         .narrow(0, 0, n)
                         .to(torch::kInt64);
  const auto table = nf4_table().to(q.packed.device());
  const auto values =
      torch::constant_pad_nd(table.index_select(0, codes), {0, q.blocks() * kNf4Block - n});
  const auto w =
      (values.view({-1, kNf4Block}) * nf4_absmax(q).unsqueeze(1)).view(-1).narrow(0, 0, n);
  out.copy_(w.view({q.rows, q.cols}));
}

}  // namespace composite

void nf4_dequantize_into(const Nf4Weight& q, torch::Tensor out) {
  TORCH_CHECK(
      out.dim() == 2 && out.size(0) == q.rows && out.size(1) == q.cols && out.is_contiguous(),
      "nf4_dequantize_into: out must be a contiguous [", q.rows, ", ", q.cols, "]");
  if (nf4_dequantize_kernel(q, dynamic_map_on(out.device()), out)) return;
  composite::nf4_dequantize_into(q, out);
}

torch::Tensor nf4_dequantize(const Nf4Weight& q, torch::ScalarType dtype) {
  auto out = torch::empty({q.rows, q.cols}, q.packed.options().dtype(dtype));
  nf4_dequantize_into(q, out);
  return out;
}

}  // namespace lorafit
