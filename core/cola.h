// COLA (Chain of LoRA, arXiv 2401.04151): at each knot the attached adapter is merged into the
// base ("tying a knot") and a fresh adapter starts, with a fresh optimizer. The merged update
// is kept as the links' low-rank factors in fp32, and at every knot the base is rebuilt from
// its original weights plus the whole chain in fp32 and cast once: a bf16 base is rounded once
// per knot from the original, never collecting the rounding of earlier knots.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "adapters/strategy.h"
#include "core/llama.h"
#include "core/recipe.h"

namespace lorafit {

/// The steps (0-based, ascending) at whose start a knot is tied, for `total` steps: at the
/// fractions cola.knots, or evenly spaced for cola.links. A ConfigError with the numbers when
/// two knots fall on the same step or a link would have no step.
std::vector<int64_t> cola_knot_steps(const ColaRecipe& cola, int64_t total);

/// The adapter settings of link `j` (0-based): cola.ranks[j] as r (alpha kept, so the scaling
/// is alpha / r_j as PEFT computes it), else the adapter's own.
AdapterSettings cola_link_settings(const ColaRecipe& cola,
                                   const AdapterSettings& settings,
                                   size_t j);

struct ColaChain {
  // The adapted projections' weights before the first knot, on the CPU: [out, in] each;
  // undefined for a quantized one, which keeps its NF4 weight and carries the chain beside it.
  std::map<std::string, torch::Tensor> original;
  // The tied links' factors, concatenated along the rank, so that the update is b a.
  std::map<std::string, torch::Tensor> a;  // [R, in] fp32
  std::map<std::string, torch::Tensor> b;  // [out, R] fp32, each link's scaling folded in
  std::vector<SavedAdapter> links;         // each tied link in its strategy's own format
};

/// A chain with no knot yet: remembers the weights of the projections that carry adapters.
ColaChain start_chain(LlamaForCausalLM& model);

/// Ties a knot: the attached adapters' updates join the chain, the base becomes original +
/// chain, and fresh adapters with `next` settings are attached (the model's outputs do not
/// change). The caller builds a new optimizer over the new adapters.
void tie_knot(ColaChain& chain,
              LlamaForCausalLM& model,
              const AdapterSpec& spec,
              const AdapterSettings& current,
              const AdapterSettings& next,
              const std::string& base_model);

/// The chain with the attached link as one PEFT LoRA of rank sum(r): A = concat A_j,
/// B = concat s_j B_j, lora_alpha = r (scaling 1).
SavedAdapter chain_adapter(const ColaChain& chain,
                           LlamaForCausalLM& model,
                           const AdapterSettings& settings,
                           const std::string& base_model);

/// Checkpoint files: DIR/chain.safetensors (the factors) and DIR/links/link-J/ (J from 1).
void save_chain(const std::string& dir, const ColaChain& chain);

/// Reads what save_chain wrote into a chain from start_chain, and rebuilds the base as at the
/// last knot.
void load_chain(const std::string& dir, ColaChain& chain, LlamaForCausalLM& model);

}  // namespace lorafit
