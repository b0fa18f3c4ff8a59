#include "adapters/dora.h"

#include "adapters/peft_names.h"
#include "core/errors.h"

namespace lorafit {

using nlohmann::json;

DoraImpl::DoraImpl(const ProjectionImpl& p, int64_t r, double scaling_, double dropout_)
    : LoraImpl(p.in_features, p.out_features, r, scaling_, dropout_, torch::device(p.device())),
      base(p.base()) {
  // B starts at zero, so ||W + s B A|| is ||W||: no W A^T product is needed.
  lora_magnitude_vector =
      register_parameter("lora_magnitude_vector", weight_norms_sq().sqrt().to(torch::kFloat32));
}

const torch::Tensor& DoraImpl::weight_norms_sq() const {
  torch::NoGradGuard no_grad;
  // An NF4 weight never changes in place: its storage names it.
  const auto& dense = base.dense;
  const auto& w = dense.defined() ? dense : base.blocks.at(0).packed;
  const auto acc = torch::promote_types(
      torch::promote_types(dense.defined() ? dense.scalar_type() : torch::kFloat,
                           lora_A.scalar_type()),
      torch::kFloat);
  if (!weight_sq.defined() || weight_sq.scalar_type() != acc || weight_version != w._version() ||
      weight_data != w.data_ptr()) {
    weight_sq = frozen(acc).pow(2).sum(1);
    weight_version = w._version();
    weight_data = w.data_ptr();
  }
  return weight_sq;
}

torch::Tensor DoraImpl::updated_norms() const {
  torch::NoGradGuard no_grad;
  const auto& w_sq = weight_norms_sq();
  const auto acc = w_sq.scalar_type();
  const auto a = lora_A.to(acc), b = lora_B.to(acc);
  const auto w = base.dense.defined() ? base.dense : frozen(lora_A.scalar_type());  // [out, in]
  const auto wa = torch::matmul(w, lora_A.to(w.scalar_type()).t()).to(acc);         // [out, r]
  const auto baa = torch::matmul(b, torch::matmul(a, a.t()));                       // [out, r]
  const auto sq = w_sq + (b * wa).sum(1) * (2 * scaling) + (b * baa).sum(1) * (scaling * scaling);
  return sq.clamp_min(0).sqrt();
}

torch::Tensor DoraImpl::column_scale() const {
  return lora_magnitude_vector / updated_norms();
}

std::optional<LowRank> DoraImpl::low_rank() const {
  if (dropout > 0 && is_training()) return std::nullopt;
  return LowRank{{{lora_A, lora_B, scaling, column_scale()}}, dropout};
}

torch::Tensor DoraImpl::forward(const torch::Tensor& x, const torch::Tensor& base) {
  namespace F = torch::nn::functional;
  const auto dtype = x.scalar_type();
  const auto g = column_scale().to(dtype);  // [out]
  const bool drop = dropout > 0 && is_training();
  const auto h = drop ? torch::dropout(x, dropout, /*train=*/true) : x;
  const auto update = F::linear(F::linear(h, lora_A.to(dtype)), lora_B.to(dtype)) * scaling;
  if (!drop) return g * (base + update);
  return base + (g - 1) * F::linear(h, frozen(dtype)) + g * update;
}

torch::Tensor DoraImpl::merged_delta() const {
  torch::NoGradGuard no_grad;
  const auto w = frozen(torch::kFloat32);
  const auto updated = w + torch::matmul(lora_B, lora_A).to(torch::kFloat32) * scaling;
  return column_scale().to(torch::kFloat32).unsqueeze(1) * updated - w;
}

AdapterSpec dora_strategy() {
  AdapterSpec spec;
  spec.name = "dora";
  spec.peft_type = "LORA";
  spec.summary = "LoRA with a trained magnitude per output channel (PEFT's DoRA, use_dora)";
  spec.reads = [](const json& config) {
    return config.value("peft_type", "") == "LORA" && config.value("use_dora", json()) == true;
  };
  spec.attach_saved = [](const json& config, const TensorMap& weights, const AdapterSites& sites,
                         const std::string& where) {
    attach_lora_format(
        config, weights, sites.projections, where, /*use_dora=*/true, {".lora_magnitude_vector"},
        [](const ProjectionImpl& p, const SavedLoraFactors& f,
           const std::vector<torch::Tensor>& extra,
           TensorBinding& binding) -> std::shared_ptr<ProjectionAdapterImpl> {
          const auto& m = extra[0];
          if (m.dim() != 1 || m.size(0) != p.out_features) {
            binding.problem("tensor '" + kPeftPrefix + p.name + ".lora_magnitude_vector' " +
                            shape_text(m.sizes()) + " does not fit the projection, expected [" +
                            std::to_string(p.out_features) + "]");
            return nullptr;
          }
          auto dora = Dora(p, f.a.size(0), f.scaling, f.dropout);
          load_factors(*dora, f);
          torch::NoGradGuard no_grad;
          dora->lora_magnitude_vector.copy_(m);
          return dora.ptr();
        });
  };
  spec.attach_new = [](const AdapterSettings& s, const AdapterSites& sites) {
    attach_to_kinds(sites.projections, s.targets, [&](const ProjectionImpl& p) {
      return Dora(p, s.r, lora_scaling(s.alpha, s.r, s.use_rslora), s.dropout).ptr();
    });
  };
  spec.save = [](const AdapterSettings& s, const AdapterSites& sites, const std::string& base) {
    auto saved = lora_save(s, sites.projections, base);
    saved.config["use_dora"] = true;
    for (const auto& p : sites.projections) {
      if (const auto* dora = p->adapter ? p->adapter->as<DoraImpl>() : nullptr) {
        saved.tensors[kPeftPrefix + p->name + ".lora_magnitude_vector"] =
            dora->lora_magnitude_vector.detach();
      }
    }
    return saved;
  };
  return spec;
}

}  // namespace lorafit
