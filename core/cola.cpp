#include "core/cola.h"

#include <cmath>
#include <filesystem>

#include "adapters/registry.h"
#include "core/adapter_io.h"
#include "core/errors.h"
#include "core/safetensors.h"

namespace lorafit {

namespace fs = std::filesystem;

std::vector<int64_t> cola_knot_steps(const ColaRecipe& cola, int64_t total) {
  std::vector<double> fractions = cola.knots;
  if (fractions.empty()) {
    for (int64_t j = 1; j < cola.links; ++j)
      fractions.push_back(static_cast<double>(j) / static_cast<double>(cola.links));
  }
  std::vector<int64_t> steps;
  for (double f : fractions) {
    const auto step = static_cast<int64_t>(std::llround(f * static_cast<double>(total)));
    if (step <= (steps.empty() ? 0 : steps.back()) || step >= total) {
      throw ConfigError("cola: a chain of " + std::to_string(cola.link_count()) + " links over " +
                        std::to_string(total) + " steps leaves a link without a step (knot at " +
                        std::to_string(f) + " of the steps is step " + std::to_string(step) +
                        "; hint: more train.steps or fewer links)");
    }
    steps.push_back(step);
  }
  return steps;
}

AdapterSettings cola_link_settings(const ColaRecipe& cola,
                                   const AdapterSettings& settings,
                                   size_t j) {
  AdapterSettings s = settings;
  if (j < cola.ranks.size()) s.r = cola.ranks[j];
  return s;
}

namespace {

// The attached adapter's update on `p` as fp32 factors (a [k, in], scaling * b [out, k]).
std::pair<torch::Tensor, torch::Tensor> link_factors(const ProjectionImpl& p) {
  const auto f = p.adapter->low_rank();
  TORCH_CHECK(f && f->terms.size() == 1 && !f->terms[0].out_scale.defined(),
              "cola: the adapter on ", p.name, " is not one low-rank term");
  const auto& t = f->terms[0];
  return {t.a.detach().to(torch::kFloat32, false, /*copy=*/true),
          (t.b.detach().to(torch::kFloat32) * t.scaling).contiguous()};
}

// Every adapted projection's weight = original + b a, summed in fp32 and cast once. A
// quantized weight stays as it is and carries the chain as its frozen low-rank term: 4 bits
// cannot take an update of a few thousandths, requantizing would round most of it away.
void rebuild_base(const ColaChain& chain, LlamaForCausalLM& model) {
  torch::NoGradGuard no_grad;
  for (auto p : model->projections()) {
    const auto it = chain.a.find(p->name);
    if (it == chain.a.end()) continue;
    const auto device = p->device();
    if (p->quantized()) {
      p->merged = LowRankTerm(it->second.to(device), chain.b.at(p->name).to(device), 1.0);
      continue;
    }
    auto w = chain.original.at(p->name).to(device, torch::kFloat32, false, /*copy=*/true);
    w.add_(torch::matmul(chain.b.at(p->name).to(device), it->second.to(device)));
    p->weight.copy_(w);
  }
}

}  // namespace

ColaChain start_chain(LlamaForCausalLM& model) {
  ColaChain chain;
  for (auto p : model->projections())
    if (p->adapter) {
      chain.original[p->name] =
          p->quantized() ? torch::Tensor() : p->weight.detach().to(torch::kCPU, false, true);
    }
  return chain;
}

void tie_knot(ColaChain& chain,
              LlamaForCausalLM& model,
              const AdapterSpec& spec,
              const AdapterSettings& current,
              const AdapterSettings& next,
              const std::string& base_model) {
  chain.links.push_back(spec.save(current, model->adapter_sites(), base_model));
  for (auto p : model->projections()) {
    if (!p->adapter) continue;
    auto [a, b] = link_factors(*p);
    const auto ia = chain.a.find(p->name);
    if (ia == chain.a.end()) {
      chain.a[p->name] = a;
      chain.b[p->name] = b;
    } else {
      ia->second = torch::cat({ia->second, a}, 0);
      chain.b[p->name] = torch::cat({chain.b[p->name], b}, 1);
    }
  }
  rebuild_base(chain, model);
  spec.attach_new(next, model->adapter_sites());
}

SavedAdapter chain_adapter(const ColaChain& chain,
                           LlamaForCausalLM& model,
                           const AdapterSettings& settings,
                           const std::string& base_model) {
  LowRankFactors factors;
  for (auto p : model->projections()) {
    if (!p->adapter) continue;
    auto [a, b] = link_factors(*p);
    if (const auto it = chain.a.find(p->name); it != chain.a.end()) {
      a = torch::cat({it->second, a}, 0);
      b = torch::cat({chain.b.at(p->name), b}, 1);
    }
    factors[p->name] = {a, b};
  }
  return low_rank_adapter(factors, settings, base_model);
}

void save_chain(const std::string& dir, const ColaChain& chain) {
  if (chain.links.empty()) return;
  TensorMap factors;
  for (const auto& [name, a] : chain.a) {
    factors[name + ".a"] = a;
    factors[name + ".b"] = chain.b.at(name);
  }
  save_safetensors((fs::path(dir) / "chain.safetensors").string(), factors);
  for (size_t j = 0; j < chain.links.size(); ++j)
    write_adapter_files((fs::path(dir) / "links" / ("link-" + std::to_string(j + 1))).string(),
                        chain.links[j]);
}

void load_chain(const std::string& dir, ColaChain& chain, LlamaForCausalLM& model) {
  const fs::path links = fs::path(dir) / "links";
  for (size_t j = 1; fs::exists(links / ("link-" + std::to_string(j))); ++j)
    chain.links.push_back(read_adapter_files((links / ("link-" + std::to_string(j))).string()));
  if (chain.links.empty()) return;  // saved before the first knot
  SafetensorsFile file((fs::path(dir) / "chain.safetensors").string());
  for (const auto& [name, w] : chain.original) {
    if (!file.find(name + ".a")) {
      throw ModelMismatchError("checkpoint '" + dir + "' has no chain factors for '" + name +
                               "' (hint: resume with the recipe that wrote it)");
    }
    chain.a[name] = file.tensor(name + ".a");
    chain.b[name] = file.tensor(name + ".b");
  }
  rebuild_base(chain, model);
}

}  // namespace lorafit
