#include "adapters/dora.h"

#include "adapters/peft_names.h"
#include "core/errors.h"

namespace lorafit {

using nlohmann::json;

namespace {

// ||W + s B A|| over each output row, without a graph, in fp32 (or the weights' wider dtype).
// weight: [out, in], a: [r, in], b: [out, r] -> [out]
torch::Tensor updated_row_norms(const torch::Tensor& weight,
                                const torch::Tensor& a,
                                const torch::Tensor& b,
                                double scaling) {
  torch::NoGradGuard no_grad;
  const auto acc = torch::promote_types(torch::promote_types(weight.scalar_type(), a.scalar_type()),
                                        torch::kFloat);
  auto w = weight.to(acc, /*non_blocking=*/false, /*copy=*/true);
  w.addmm_(b.to(acc), a.to(acc), 1, scaling);
  return torch::linalg_vector_norm(w, 2, std::vector<int64_t>{1}, false, c10::nullopt);
}

}  // namespace

DoraImpl::DoraImpl(const ProjectionImpl& p, int64_t r, double scaling_, double dropout_)
    : LoraImpl(
          p.in_features, p.out_features, r, scaling_, dropout_, torch::device(p.weight.device())),
      weight(p.weight) {
  lora_magnitude_vector =
      register_parameter("lora_magnitude_vector",
                         updated_row_norms(weight, lora_A, lora_B, scaling).to(torch::kFloat32));
}

torch::Tensor DoraImpl::column_scale() const {
  const auto norm = updated_row_norms(weight, lora_A, lora_B, scaling);
  return lora_magnitude_vector / norm;
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
  return base + (g - 1) * F::linear(h, weight.to(dtype)) + g * update;
}

torch::Tensor DoraImpl::merged_delta() const {
  torch::NoGradGuard no_grad;
  const auto w = weight.to(torch::kFloat32);
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
           std::vector<std::string>& problems) -> std::shared_ptr<ProjectionAdapterImpl> {
          const auto& m = extra[0];
          if (m.dim() != 1 || m.size(0) != p.out_features) {
            problems.push_back("tensor '" + kPeftPrefix + p.name + ".lora_magnitude_vector' " +
                               shape_text(m.sizes()) + " does not fit the projection, expected [" +
                               std::to_string(p.out_features) + "]");
            return nullptr;
          }
          auto dora = Dora(p, f.a.size(0), f.scaling, f.dropout);
          torch::NoGradGuard no_grad;
          dora->lora_A.copy_(f.a);
          dora->lora_B.copy_(f.b);
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
