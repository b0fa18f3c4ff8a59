// NF4 storage (core/nf4.h) and the quantized base under the projection hook, the model and
// COLA: bitsandbytes' layout on hand-computed cases, the error NF4 allows, and that a quantized
// model computes exactly what a dense model holding the dequantized weights computes.
#include <catch2/catch.hpp>

#include "adapters/job_routing.h"
#include "adapters/registry.h"
#include "core/cola.h"
#include "core/llama.h"
#include "core/nf4.h"
#include "test_util.h"

using namespace lorafit;
using lorafit::test::fixture;

namespace {

torch::Tensor table() {
  return torch::tensor(std::vector<float>(nf4_codebook().begin(), nf4_codebook().end()));
}

// Every NF4 code of a weight, in element order. [n] int64
torch::Tensor codes_of(const Nf4Weight& q) {
  return torch::stack({q.packed.bitwise_right_shift(4), q.packed.bitwise_and(15)}, 1)
      .view(-1)
      .narrow(0, 0, q.rows * q.cols)
      .to(torch::kInt64);
}

// A dense model whose quantized projections hold their dequantized weights, beside it.
LlamaForCausalLM dense_twin(const LlamaForCausalLM& quantized, torch::Dtype dtype) {
  auto dense = load_llama(fixture("gqa_llama3/model"), torch::kCPU, dtype);
  torch::NoGradGuard no_grad;
  const auto qs = quantized->projections(), ds = dense->projections();
  for (size_t i = 0; i < qs.size(); ++i) ds[i]->weight.copy_(nf4_dequantize(qs[i]->nf4, dtype));
  return dense;
}

torch::Tensor logits(LlamaForCausalLM model, const torch::Tensor& ids) {
  torch::NoGradGuard g;
  model->eval();
  return model->logits(model->forward(ids));
}

}  // namespace

TEST_CASE("the NF4 codebook is the QLoRA paper's normal quantiles", "[core][nf4]") {
  // bitsandbytes' create_normal_map(0.9677083, use_extra_value=True): 8 positive quantiles of
  // N(0, 1) between p = 0.9677083 and 0.5, 7 negative ones, and 0, scaled by the largest.
  auto ppf = [](const torch::Tensor& p) { return torch::erfinv(p * 2 - 1) * std::sqrt(2.0); };
  const double offset = 0.9677083;
  const auto pos = ppf(torch::linspace(offset, 0.5, 9, torch::kFloat64).narrow(0, 0, 8));
  const auto neg = -ppf(torch::linspace(offset, 0.5, 8, torch::kFloat64).narrow(0, 0, 7));
  auto v = std::get<0>(torch::cat({pos, neg, torch::zeros({1}, torch::kFloat64)}).sort());
  v = v / v.max();
  REQUIRE(nf4_codebook().size() == 16);
  REQUIRE(torch::allclose(table().to(torch::kFloat64), v, 0, 1e-6));
  // The published table's ends and its exact zero.
  REQUIRE(nf4_codebook()[0] == -1.0f);
  REQUIRE(nf4_codebook()[7] == 0.0f);
  REQUIRE(nf4_codebook()[15] == 1.0f);
  REQUIRE(nf4_codebook()[8] == 0.07958029955625534f);
}

TEST_CASE("the dynamic map of double quantization is bitsandbytes' signed 8-bit map",
          "[core][nf4]") {
  const auto m = dynamic_map();
  REQUIRE(m.size(0) == 256);
  REQUIRE(torch::equal(m, std::get<0>(m.sort())));
  REQUIRE(std::get<0>(at::_unique(m)).size(0) == 256);
  REQUIRE(m[255].item<float>() == 1.0f);
  REQUIRE((m == 0).sum().item<int64_t>() == 1);
  // The exponent 10^0 has 64 fraction steps: midpoints of linspace(0.1, 1, 65); the largest is
  // 1 - 0.9 / 128, and -(that) is the smallest value (no -1 in the map).
  REQUIRE(m[254].item<float>() == Approx(1 - 0.9 / 128).epsilon(1e-7));
  REQUIRE(m[0].item<float>() == Approx(-(1 - 0.9 / 128)).epsilon(1e-7));
  // 10^-6 has one step: (0.1 + 1) / 2 * 1e-6 is the smallest positive value.
  REQUIRE(m.masked_select(m > 0).min().item<float>() == Approx(0.55e-6).epsilon(1e-6));
  // 127 values per sign.
  REQUIRE((m < 0).sum().item<int64_t>() == 127);
}

TEST_CASE("quantization on a hand-computed case: block absmax, packing, double quantization",
          "[core][nf4]") {
  // Two blocks of 64: block 0 has absmax 3, block 1 absmax 0.5.
  auto w = torch::zeros({2, 64});
  w[0][0] = -3.0;  // -1 * 3: code 0
  w[0][1] = 0.9;   // 0.3 lies above the midpoint of 0.2461 and 0.3379: code 11
  w[0][2] = 0.1;   // 0.0333 is below the midpoint 0.0398 of 0 and 0.0796: code 7 (zero)
  w[1][5] = 0.5;   // 1 * 0.5: code 15
  w[1][6] = -0.2;  // -0.4 lies between -0.3949 and -0.5251, nearer -0.3949: code 3
  const auto q = nf4_quantize(w);
  REQUIRE(q.rows == 2);
  REQUIRE(q.cols == 64);
  REQUIRE(q.packed.size(0) == 64);
  REQUIRE(q.packed.scalar_type() == torch::kUInt8);
  // Element 0 in the high nibble: codes 0 and 11 make 0x0B.
  REQUIRE(q.packed[0].item<int64_t>() == 0x0B);
  REQUIRE(q.packed[1].item<int64_t>() == 0x77);  // 0.1 and 0: zero codes
  const auto c = codes_of(q);
  REQUIRE(c[2].item<int64_t>() == 7);
  REQUIRE(c[64 + 5].item<int64_t>() == 15);
  REQUIRE(c[64 + 6].item<int64_t>() == 3);
  // Double quantization: offset = mean(3, 0.5) = 1.75; the centred absmaxes (1.25, -1.25) have
  // absmax 1.25 and scale to (1, -1); 1 is in the map, -1 is not: its nearest is -(1 - 0.9/128).
  REQUIRE(q.offset.item<float>() == 1.75f);
  REQUIRE(q.absmax_scale.size(0) == 1);
  REQUIRE(q.absmax_scale.item<float>() == 1.25f);
  REQUIRE(q.absmax[0].item<int64_t>() == 255);
  REQUIRE(q.absmax[1].item<int64_t>() == 0);
  const auto absmax = nf4_absmax(q);
  REQUIRE(absmax[0].item<float>() == 3.0f);
  const double second = -(1 - 0.9 / 128) * 1.25 + 1.75;  // 0.50878906
  REQUIRE(absmax[1].item<float>() == Approx(second).epsilon(1e-6));
  // Dequantized: code value times the block's decoded absmax.
  const auto d = nf4_dequantize(q, torch::kFloat32);
  REQUIRE(d[0][0].item<float>() == -3.0f);
  REQUIRE(d[0][1].item<float>() == Approx(0.33791524171829224 * 3).epsilon(1e-6));
  REQUIRE(d[0][2].item<float>() == 0.0f);
  REQUIRE(d[1][5].item<float>() == Approx(second).epsilon(1e-6));
  REQUIRE(d[1][6].item<float>() == Approx(-0.39491748809814453 * second).epsilon(1e-6));
  REQUIRE(q.bytes() == 64 + 2 + 4 + 4);
}

TEST_CASE("a partial last block and an odd count quantize as bitsandbytes pads them",
          "[core][nf4]") {
  torch::manual_seed(1);
  const auto w = torch::randn({3, 23});  // 69 weights: a block of 64 and one of 5, odd
  const auto q = nf4_quantize(w);
  REQUIRE(q.blocks() == 2);
  REQUIRE(q.packed.size(0) == 35);
  REQUIRE((q.packed[34].item<int64_t>() & 15) == 7);  // the padding is a zero code
  const auto flat = w.reshape(-1);
  const auto absmax =
      torch::stack({flat.narrow(0, 0, 64).abs().max(), flat.narrow(0, 64, 5).abs().max()});
  // Nearest codes: each weight's code is the closest value to w / absmax (decoded absmaxes
  // differ from the true ones by the double quantization only).
  const auto scaled = flat / absmax.repeat_interleave(torch::tensor({64, 5}));
  const auto nearest = (scaled.unsqueeze(1) - table().unsqueeze(0)).abs().argmin(1);
  REQUIRE(torch::equal(codes_of(q), nearest));
  REQUIRE(torch::allclose(nf4_absmax(q), absmax, 1e-2, 0));
}

TEST_CASE("NF4's error on normal weights stays within half a code gap of each block's absmax",
          "[core][nf4]") {
  torch::manual_seed(0);
  const auto w = torch::randn({512, 1024}) * 0.02;  // N(0, 0.02), a trained LLaMA's scale
  const auto q = nf4_quantize(w);
  const auto d = nf4_dequantize(q, torch::kFloat32);
  const auto err = (d - w).abs().view({-1, kNf4Block});  // [blocks, 64]
  const auto true_absmax = w.abs().view({-1, kNf4Block}).amax(1);
  const auto decoded = nf4_absmax(q);
  // Rounding to the nearest code costs at most half the widest gap (between -1 and -0.696)
  // times the block's absmax; the decoded absmax adds its own error times |code| <= 1.
  const double half_gap = (nf4_codebook()[1] - nf4_codebook()[0]) / 2;
  const auto bound = (true_absmax * half_gap + (decoded - true_absmax).abs()) * (1 + 1e-5) + 1e-8;
  REQUIRE((err <= bound.unsqueeze(1)).all().item<bool>());
  // Double quantization of the absmaxes: within one step of the 8-bit map near 1 (0.9 / 64) of
  // the largest centred absmax.
  const auto centred = (true_absmax - true_absmax.mean()).abs().max().item<double>();
  REQUIRE((decoded - true_absmax).abs().max().item<double>() <= centred * 0.9 / 128 + 1e-7);
  // The measured figure: RMS error over the weights' standard deviation.
  const double rel_rms = (d - w).pow(2).mean().sqrt().item<double>() / w.std().item<double>();
  INFO("NF4 RMS error / std: " << rel_rms);
  WARN("NF4 RMS error / std of N(0, 0.02) weights: " << rel_rms);
  REQUIRE(rel_rms < 0.12);
  REQUIRE(q.bytes() * 8.0 / w.numel() < 4.2);  // 4 bits a weight + 8 bits per 64 + fp32 per 16384
}

TEST_CASE("a quantized model computes what a dense model of its dequantized weights computes",
          "[core][nf4]") {
  torch::manual_seed(0);
  auto q = load_llama(fixture("gqa_llama3/model"), torch::kCPU, torch::kFloat64, Quantize::Nf4);
  REQUIRE(q->quantized_projections().size() == q->projections().size());
  for (const auto& [name, t] : q->checkpoint_tensors())
    REQUIRE(name.find("_proj") == std::string::npos);  // no dense projection weight left
  auto d = dense_twin(q, torch::kFloat64);
  // The stored weights are the checkpoint's, quantized.
  const auto full = load_llama(fixture("gqa_llama3/model"), torch::kCPU, torch::kFloat64);
  const auto w0 = full->projections()[0]->weight;
  REQUIRE(torch::equal(q->projections()[0]->nf4.packed, nf4_quantize(w0).packed));
  REQUIRE(lorafit::test::rel_err(nf4_dequantize(q->projections()[0]->nf4, torch::kFloat64), w0) <
          0.2);
  const auto ids = torch::randint(3, 320, {2, 11}, torch::kInt64);
  REQUIRE(torch::allclose(logits(q, ids), logits(d, ids), 1e-12, 1e-12));

  // Every strategy trains on it with the gradients of the dense twin, checkpointed or not.
  for (const std::string type : {"lora", "dora", "multilora", "mixlora"}) {
    for (bool checkpoint : {false, true}) {
      INFO(type << " checkpoint " << checkpoint);
      auto qm =
          load_llama(fixture("gqa_llama3/model"), torch::kCPU, torch::kFloat64, Quantize::Nf4);
      auto dm = dense_twin(qm, torch::kFloat64);
      AdapterSettings s{
          4,
          8.0,
          0.0,
          false,
          {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}};
      const auto& spec = find_adapter(type);
      std::vector<std::vector<torch::Tensor>> grads;
      for (auto* m : {&qm, &dm}) {
        torch::manual_seed(3);
        spec.attach_new(s, (*m)->adapter_sites());
        (*m)->to(torch::kFloat64);
        auto params = adapter_parameters((*m)->adapter_sites());
        {
          torch::NoGradGuard g;
          for (auto& p : params) p.normal_(0.0, 0.1);
        }
        for (auto& p : params) p.set_requires_grad(true);
        (*m)->train();
        (*m)->checkpoint_layers = checkpoint;
        const auto out = (*m)->logits((*m)->forward(ids)).pow(2).mean();
        out.backward();
        std::vector<torch::Tensor> g;
        for (auto& p : params) g.push_back(p.grad().clone());
        grads.push_back(g);
      }
      // (MixLoRA's experts that no token chose have zero gradients on both.)
      REQUIRE(grads[0].size() == grads[1].size());
      double total = 0;
      for (size_t i = 0; i < grads[0].size(); ++i) {
        INFO("gradient " << i);
        REQUIRE(torch::allclose(grads[0][i], grads[1][i], 1e-10, 1e-12));
        total += grads[1][i].abs().sum().item<double>();
      }
      REQUIRE(total > 0);
    }
  }
}

TEST_CASE("the jobs' views of a quantized base share its 4-bit storage", "[core][nf4]") {
  auto q = load_llama(fixture("gqa_llama3/model"), torch::kCPU, torch::kFloat64, Quantize::Nf4);
  const auto routing = route_jobs(q->adapter_sites(), 2);
  const auto model = q->projections();
  for (size_t j = 0; j < 2; ++j) {
    const auto& views = routing.sites[j].projections;
    REQUIRE(views.size() == model.size());
    for (size_t i = 0; i < views.size(); ++i) {
      REQUIRE_FALSE(views[i]->weight.defined());
      REQUIRE(views[i]->nf4.packed.data_ptr() == model[i]->nf4.packed.data_ptr());
    }
  }
}

TEST_CASE("COLA on a quantized base keeps the chain exact beside the NF4 weights",
          "[core][nf4][cola]") {
  torch::manual_seed(0);
  auto model = load_llama(fixture("gqa_llama3/model"), torch::kCPU, torch::kFloat64, Quantize::Nf4);
  const auto& spec = find_adapter("lora");
  AdapterSettings s{4, 8.0, 0.0, false, {"q_proj", "v_proj", "down_proj"}};
  spec.attach_new(s, model->adapter_sites());
  model->to(torch::kFloat64);
  {
    torch::NoGradGuard g;
    for (auto& t : adapter_parameters(model->adapter_sites())) t.normal_(0.0, 0.2);
  }
  auto chain = start_chain(model);
  const auto ids = torch::randint(3, 320, {2, 9}, torch::kInt64);
  const auto before = logits(model, ids);
  const auto packed = model->projections()[0]->nf4.packed.clone();
  tie_knot(chain, model, spec, s, s, "base");
  // The outputs do not move at the knot (the chain keeps the links in fp32), and the 4-bit
  // weights are untouched.
  REQUIRE(torch::allclose(logits(model, ids), before, 1e-5, 1e-5));
  REQUIRE(torch::equal(model->projections()[0]->nf4.packed, packed));
  REQUIRE(model->projections()[0]->merged.a.size(0) == 4);
  // What requantizing the merged weight would cost instead, for a link of a typical LoRA
  // update's size (5% of the weights' RMS): most of it is rounded away.
  const auto p = model->projections()[0];
  const auto w = nf4_dequantize(p->nf4, torch::kFloat32);
  auto link = torch::matmul(p->merged.b, p->merged.a).to(torch::kFloat32);  // [out, in]
  link = link * (0.05 * w.pow(2).mean().sqrt() / link.pow(2).mean().sqrt());
  const auto requantized = nf4_dequantize(nf4_quantize(w + link), torch::kFloat32);
  const double kept =
      ((requantized - w) * link).sum().item<double>() / link.pow(2).sum().item<double>();
  WARN("COLA knot by requantization keeps " << kept << " of the link (kept exactly instead)");
  REQUIRE(kept < 0.5);
}
