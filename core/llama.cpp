#include "core/llama.h"

#include <cmath>
#include <future>
#include <map>
#include <numeric>

#include "core/compat.h"
#include "core/errors.h"
#include "core/fused_ops.h"
#include "core/safetensors.h"

namespace lorafit {

namespace {

// Threads that copy checkpoint tensors to the model while loading.
constexpr size_t kLoadThreads = 8;

torch::Tensor frozen(torch::nn::Module& m,
                     const char* name,
                     torch::IntArrayRef shape,
                     const torch::TensorOptions& o) {
  return m.register_parameter(name, torch::empty(shape, o), /*requires_grad=*/false);
}

// Python's `scalar / tensor` is `tensor.reciprocal() * scalar`; matching it keeps RoPE
// frequencies bit-identical to transformers'.
torch::Tensor rdiv(double scalar, const torch::Tensor& t) {
  return t.reciprocal() * scalar;
}

}  // namespace

RMSNormImpl::RMSNormImpl(int64_t dim, double eps_, const torch::TensorOptions& o) : eps(eps_) {
  weight = frozen(*this, "weight", {dim}, o);
}

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) {
  return rms_norm(x, weight, eps);
}

EmbeddingImpl::EmbeddingImpl(int64_t vocab, int64_t dim, const torch::TensorOptions& o) {
  weight = frozen(*this, "weight", {vocab, dim}, o);
}

void EmbeddingImpl::untie() {
  weight = weight.detach().clone();
  parameters_["weight"] = weight;
}

torch::Tensor EmbeddingImpl::forward(const torch::Tensor& ids) {
  return torch::embedding(weight, ids);
}

AttentionImpl::AttentionImpl(const LlamaConfig& c,
                             const std::string& prefix,
                             const torch::TensorOptions& o,
                             Quantize quantize)
    : heads(c.num_attention_heads), kv_heads(c.num_key_value_heads), head_dim(c.head_dim) {
  const auto hidden = c.hidden_size, q = heads * head_dim, kv = kv_heads * head_dim;
  const bool nf4 = quantize == Quantize::Nf4;
  // One allocation for the three, so they can run as one GEMM (project_group).
  if (!nf4) qkv_weight = torch::empty({q + 2 * kv, hidden}, o);
  if (c.qkv_bias) qkv_bias = torch::empty({q + 2 * kv}, o);
  auto bias = [&](int64_t at, int64_t n) {
    return c.qkv_bias ? qkv_bias.narrow(0, at, n) : torch::Tensor();
  };
  auto rows = [&](int64_t at, int64_t n) {
    return nf4 ? torch::Tensor() : qkv_weight.narrow(0, at, n);
  };
  q_proj = register_module(
      "q_proj", Projection(prefix + ".q_proj", hidden, q, o, rows(0, q), bias(0, q), nf4));
  k_proj = register_module(
      "k_proj", Projection(prefix + ".k_proj", hidden, kv, o, rows(q, kv), bias(q, kv), nf4));
  v_proj = register_module("v_proj", Projection(prefix + ".v_proj", hidden, kv, o, rows(q + kv, kv),
                                                bias(q + kv, kv), nf4));
  o_proj = register_module("o_proj",
                           Projection(prefix + ".o_proj", q, hidden, o, torch::Tensor(),
                                      c.o_bias ? torch::empty({hidden}, o) : torch::Tensor(), nf4));
  if (c.qk_norm) {
    q_norm = register_module("q_norm", RMSNorm(head_dim, c.rms_norm_eps, o));
    k_norm = register_module("k_norm", RMSNorm(head_dim, c.rms_norm_eps, o));
  }
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x,
                                     const Positions& pos,
                                     KVCache* cache,
                                     size_t layer,
                                     compat::AttentionState* kept,
                                     bool value_needed) {
  const auto b = x.size(0), t = x.size(1);
  auto qkv = project_group(x, qkv_weight, {q_proj.get(), k_proj.get(), v_proj.get()},
                           qkv_bias);  // [B, T, (H + 2 KV) * D]
  if (q_norm) {
    // Qwen3 normalises each head of q and k over D before RoPE.
    const auto q_width = heads * head_dim, k_width = kv_heads * head_dim;
    auto norm = [&](RMSNorm& n, int64_t at, int64_t width) {
      return n(qkv.narrow(-1, at, width).view({b, t, -1, head_dim})).view({b, t, width});
    };
    qkv = torch::cat({norm(q_norm, 0, q_width), norm(k_norm, q_width, k_width),
                      qkv.narrow(-1, q_width + k_width, k_width)},
                     -1);
  }
  auto [q, k, v] = split_rope(qkv, heads, kv_heads, pos.cos, pos.sin);  // [B, H|KV, T, D]
  int64_t offset = 0;
  if (cache) {
    offset = cache->length;
    if (cache->k.size() <= layer) cache->k.resize(layer + 1), cache->v.resize(layer + 1);
    if (cache->k[layer].defined()) {
      k = torch::cat({cache->k[layer], k}, 2);
      v = torch::cat({cache->v[layer], v}, 2);
    }
    cache->k[layer] = k;
    cache->v[layer] = v;
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  torch::Tensor y;  // [B, H, T, D]
  // Not tied to grad mode: a checkpointed layer runs its forward without gradients.
  if (s2_ratio > 0 && is_training() && !cache) {
    const double group = s2_ratio * static_cast<double>(t);
    if (group != std::floor(group)) {
      throw ConfigError("S2-Attn: longlora.group_ratio " + std::to_string(s2_ratio) + " of " +
                        std::to_string(t) + " tokens is no whole group (hint: make " +
                        "data.max_seq_len a multiple of 1 / group_ratio, with packing: concat)");
    }
    y = s2_attention(q, k, v, scale, static_cast<int64_t>(group), s2_shift, pos.keep,
                     pos.segments.ids);
  } else if (kept && !cache && compat::has_varlen_flash(q)) {
    y = kept_attention(q, k, v, scale, pos.segments.cu_seqlens, pos.segments.max_len, *kept);
  } else if (pos.segments.defined()) {
    y = record_attention(q, k, v, scale, pos.segments.ids, pos.segments.cu_seqlens,
                         pos.segments.max_len);
  } else {
    y = causal_attention(q, k, v, scale, offset);
  }
  return o_proj->forward(y.transpose(1, 2).reshape({b, t, heads * head_dim}), value_needed);
}

MlpImpl::MlpImpl(const LlamaConfig& c,
                 const std::string& prefix,
                 const torch::TensorOptions& o,
                 Quantize quantize) {
  const auto h = c.hidden_size, i = c.intermediate_size;
  const bool nf4 = quantize == Quantize::Nf4;
  // One allocation: one GEMM (project_group).
  if (!nf4) gate_up_weight = torch::empty({2 * i, h}, o);
  auto rows = [&](int64_t at) { return nf4 ? torch::Tensor() : gate_up_weight.narrow(0, at, i); };
  gate_proj = register_module(
      "gate_proj", Projection(prefix + ".gate_proj", h, i, o, rows(0), torch::Tensor(), nf4));
  up_proj = register_module(
      "up_proj", Projection(prefix + ".up_proj", h, i, o, rows(i), torch::Tensor(), nf4));
  down_proj = register_module("down_proj", Projection(prefix + ".down_proj", i, h, o,
                                                      torch::Tensor(), torch::Tensor(), nf4));
}

void MlpImpl::attach(std::shared_ptr<FfnAdapterImpl> a) {
  adapter =
      adapter ? replace_module("adapter", std::move(a)) : register_module("adapter", std::move(a));
}

torch::Tensor MlpImpl::forward(const torch::Tensor& x, bool value_needed) {
  if (adapter) {
    // A block adapter reads the frozen weights themselves: a quantized base lends it transient
    // dequantized copies in the activations' dtype (gate's and up's into one buffer).
    const auto dtype = x.scalar_type();
    const auto gate_up = gate_up_weight.defined()
                             ? BaseWeight(gate_up_weight)
                             : BaseWeight(std::vector<Nf4Weight>{gate_proj->nf4, up_proj->nf4});
    return adapter
        ->forward(x.reshape({-1, x.size(-1)}), gate_up.materialize(dtype),
                  down_proj->base().materialize(dtype))
        .view(x.sizes());
  }
  return forward_plain(x, value_needed);
}

torch::Tensor MlpImpl::forward_plain(const torch::Tensor& x, bool value_needed) {
  return down(gate_up(x), value_needed);
}

torch::Tensor MlpImpl::gate_up(const torch::Tensor& x, bool value_needed) {
  return project_group(x, gate_up_weight, {gate_proj.get(), up_proj.get()}, {}, value_needed);
}

torch::Tensor MlpImpl::down(const torch::Tensor& gate_up, bool value_needed) {
  return down_proj->forward(swiglu(gate_up), value_needed);
}

DecoderLayerImpl::DecoderLayerImpl(const LlamaConfig& c,
                                   int64_t index,
                                   const torch::TensorOptions& o,
                                   Quantize quantize) {
  const std::string prefix = "model.layers." + std::to_string(index);
  input_layernorm = register_module("input_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps, o));
  self_attn = register_module("self_attn", Attention(c, prefix + ".self_attn", o, quantize));
  post_attention_layernorm =
      register_module("post_attention_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps, o));
  mlp = register_module("mlp", Mlp(c, prefix + ".mlp", o, quantize));
}

torch::Tensor DecoderLayerImpl::forward(const torch::Tensor& h,
                                        const Positions& pos,
                                        KVCache* cache,
                                        size_t layer) {
  auto x = h + self_attn(input_layernorm(h), pos, cache, layer);
  return x + mlp(post_attention_layernorm(x));
}

struct LayerKept {
  compat::AttentionState attention;
  torch::Tensor residual;  // [B, T, C]: h + attn
  torch::Tensor gate_up;   // [B, T, 2I]: the gate and up projections' output
};

torch::Tensor DecoderLayerImpl::forward_keeping(const torch::Tensor& h,
                                                const Positions& pos,
                                                CheckpointKeep keep,
                                                LayerKept& kept) {
  auto x = h + self_attn(input_layernorm(h), pos, nullptr, 0,
                         keep.attention ? &kept.attention : nullptr);
  if (keep.residual) kept.residual = x;
  if (!keep.gate_up || mlp->adapter) return x + mlp(post_attention_layernorm(x));
  kept.gate_up = mlp->gate_up(post_attention_layernorm(x));
  return x + mlp->down(kept.gate_up);
}

torch::Tensor DecoderLayerImpl::backward_by_recomputing(const torch::Tensor& h,
                                                        const Positions& pos,
                                                        const torch::Tensor& grad,
                                                        LayerKept& kept) {
  auto hg = h.detach().requires_grad_(true);
  torch::AutoGradMode grad_on(true);
  const bool from_residual = kept.residual.defined();
  auto attn = self_attn(input_layernorm(hg), pos, nullptr, 0,
                        kept.attention.defined() ? &kept.attention : nullptr,
                        /*value_needed=*/!from_residual);
  // From the kept residual the MLP's part of the graph stops at x, whose gradient then goes
  // into the attention's part: two passes, where one pass through h + attn needs its value.
  auto x = from_residual ? kept.residual.detach().requires_grad_(true) : hg + attn;
  std::vector<torch::Tensor> roots, root_grads;
  if (kept.gate_up.defined()) {
    // The MLP's backward starts from the kept gate/up output, whose gradient then enters the
    // projections' graph (built first, as the forward drew its dropout masks).
    auto gate_up = mlp->gate_up(post_attention_layernorm(x), /*value_needed=*/false);
    auto kept_gate_up = kept.gate_up.detach().requires_grad_(true);
    torch::autograd::backward({mlp->down(kept_gate_up, /*value_needed=*/false)}, {grad});
    roots.push_back(gate_up), root_grads.push_back(kept_gate_up.grad());
  } else {
    roots.push_back(mlp->forward(post_attention_layernorm(x), /*value_needed=*/false));
    root_grads.push_back(grad);
  }
  if (!from_residual) roots.push_back(x), root_grads.push_back(grad);
  if (mlp->adapter) {
    if (auto aux = mlp->adapter->take_backward_root(); aux.defined()) {
      roots.push_back(aux);
      root_grads.push_back(torch::ones_like(aux));
    }
  }
  torch::autograd::backward(roots, root_grads);
  if (!from_residual) return hg.grad();
  const auto x_grad = grad + x.grad();  // [B, T, C]
  torch::autograd::backward({attn}, {x_grad});
  return hg.grad() + x_grad;
}

LlamaBodyImpl::LlamaBodyImpl(const LlamaConfig& c,
                             const torch::TensorOptions& o,
                             Quantize quantize) {
  embed_tokens = register_module("embed_tokens", Embedding(c.vocab_size, c.hidden_size, o));
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_hidden_layers; ++i)
    layers->push_back(DecoderLayer(c, i, o, quantize));
  norm = register_module("norm", RMSNorm(c.hidden_size, c.rms_norm_eps, o));
}

LlamaForCausalLMImpl::LlamaForCausalLMImpl(const LlamaConfig& c,
                                           const torch::TensorOptions& o,
                                           Quantize quantize)
    : config(c) {
  model = register_module("model", LlamaBody(c, o, quantize));
  lm_head = register_module(
      "lm_head", Projection("lm_head", c.hidden_size, c.vocab_size, o,
                            c.tie_word_embeddings ? model->embed_tokens->weight : torch::Tensor()));
  inv_freq = rope_inv_freq(c).to(o.device());
}

torch::Tensor rope_inv_freq(const LlamaConfig& c) {
  const auto& r = c.rope;
  const auto dim = c.head_dim;
  auto exponents = torch::arange(0, dim, 2, torch::kInt64).to(torch::kFloat32) / dim;
  auto inv_freq = rdiv(1.0, torch::pow(r.theta, exponents));  // [D/2] f32
  if (r.type == RopeType::Linear) return inv_freq / r.factor;
  if (r.type != RopeType::Llama3) return inv_freq;

  const double old_len = static_cast<double>(r.original_max_position_embeddings);
  const double low_wavelen = old_len / r.low_freq_factor;
  const double high_wavelen = old_len / r.high_freq_factor;
  auto wavelen = rdiv(2 * M_PI, inv_freq);
  // Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
  auto scaled = torch::where(wavelen > low_wavelen, inv_freq / r.factor, inv_freq);
  auto smooth =
      (rdiv(old_len, wavelen) - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
  auto smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled;
  auto medium = (wavelen >= high_wavelen).logical_and(wavelen <= low_wavelen);
  return torch::where(medium, smoothed, scaled);
}

namespace {

// at: [...] fp32 positions -> cos, sin [..., D] in `dtype`
Positions rope_tables(const torch::Tensor& at, const torch::Tensor& inv_freq, torch::Dtype dtype) {
  auto freqs = at.unsqueeze(-1) * inv_freq;   // [..., D/2]
  auto emb = torch::cat({freqs, freqs}, -1);  // [..., D]
  return {emb.cos().to(dtype), emb.sin().to(dtype), {}, {}};
}

}  // namespace

Positions LlamaForCausalLMImpl::positions(int64_t start, int64_t t, torch::Dtype dtype) const {
  return rope_tables(
      torch::arange(start, start + t, torch::dtype(torch::kFloat32).device(inv_freq.device())),
      inv_freq, dtype);
}

Positions LlamaForCausalLMImpl::positions(const torch::Tensor& at, torch::Dtype dtype) const {
  return rope_tables(at.to(torch::kFloat32), inv_freq, dtype);
}

namespace {

// Activation checkpointing for one decoder layer: the forward keeps only the layer's input
// (and what train.checkpoint_keep asks); the backward runs the layer again with gradients on
// and back-propagates through it (DecoderLayerImpl::backward_by_recomputing). The RNG state is
// replayed so the recomputation draws the same dropout masks.
// LibTorch 1.13's Function::apply takes no undefined tensor: "no padding" and "no packed
// records" travel as empty tensors.
torch::Tensor arg(const torch::Tensor& t) {
  return t.defined() ? t : torch::empty({0});
}
torch::Tensor of_arg(const torch::Tensor& a) {
  return a.numel() ? a : torch::Tensor();
}
Positions positions_of(const torch::autograd::variable_list& saved, int64_t max_len) {
  return {saved[1], saved[2], of_arg(saved[3]),
          Segments{torch::Tensor(), of_arg(saved[4]), of_arg(saved[5]), max_len}};
}

struct CheckpointedLayer : torch::autograd::Function<CheckpointedLayer> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx,
                               torch::Tensor h,
                               torch::Tensor cos,
                               torch::Tensor sin,
                               torch::Tensor keep,
                               torch::Tensor segment_ids,
                               torch::Tensor cu_seqlens,
                               int64_t max_len,
                               int64_t layer_address,
                               bool keep_attention,
                               bool keep_residual,
                               bool keep_gate_up) {
    ctx->saved_data["layer"] = layer_address;
    ctx->saved_data["max_len"] = max_len;
    ctx->saved_data["rng"] = compat::rng_state(h.device());
    torch::NoGradGuard no_grad;
    LayerKept kept;
    auto out = reinterpret_cast<DecoderLayerImpl*>(layer_address)
                   ->forward_keeping(
                       h, positions_of({h, cos, sin, keep, segment_ids, cu_seqlens}, max_len),
                       {keep_attention, keep_residual, keep_gate_up}, kept);
    const auto& a = kept.attention;
    ctx->save_for_backward({h, cos, sin, keep, segment_ids, cu_seqlens, arg(a.out), arg(a.lse),
                            arg(a.seed), arg(a.offset), arg(kept.residual), arg(kept.gate_up)});
    return out;
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto* layer = reinterpret_cast<DecoderLayerImpl*>(ctx->saved_data["layer"].toInt());
    const auto& h = saved[0];
    LayerKept kept;
    if (of_arg(saved[6]).defined()) kept.attention = {saved[6], saved[7], saved[8], saved[9]};
    kept.residual = of_arg(saved[10]);
    kept.gate_up = of_arg(saved[11]);
    const auto now = compat::rng_state(h.device());
    compat::set_rng_state(h.device(), ctx->saved_data["rng"].toTensor());
    auto h_grad = layer->backward_by_recomputing(
        h, positions_of(saved, ctx->saved_data["max_len"].toInt()), grads[0], kept);
    compat::set_rng_state(h.device(), now);
    torch::autograd::tensor_list out(11);
    out[0] = h_grad;
    return out;
  }
};

}  // namespace

torch::Tensor LlamaForCausalLMImpl::forward(const torch::Tensor& ids,
                                            KVCache* cache,
                                            const torch::Tensor& keep,
                                            const Segments& segments) {
  TORCH_CHECK(!(cache && segments.defined()), "forward: packed records with a KV cache");
  const int64_t start = cache ? cache->length : 0;
  check_sliding_window(config, start + ids.size(1), "the model's forward");
  auto h = model->embed_tokens(ids);  // [B, T, C]
  auto pos = segments.defined() ? positions(segments.positions, h.scalar_type())
                                : positions(start, ids.size(1), h.scalar_type());
  pos.keep = keep;
  pos.segments = segments;
  const bool checkpoint =
      checkpoint_layers && is_training() && torch::GradMode::is_enabled() && !cache;
  // A checkpointed layer's output needs grad only if an input does (its adapter's weights are
  // not inputs); with a frozen embedding, mark its output.
  if (checkpoint && !h.requires_grad()) h = h.detach().requires_grad_(true);
  for (size_t i = 0; i < model->layers->size(); ++i) {
    auto* layer = model->layers[i]->as<DecoderLayerImpl>();
    const auto keeps = checkpoint_keep.in_layer(static_cast<int64_t>(i));
    h = checkpoint ? CheckpointedLayer::apply(h, pos.cos, pos.sin, arg(pos.keep), arg(segments.ids),
                                              arg(segments.cu_seqlens), segments.max_len,
                                              reinterpret_cast<int64_t>(layer), keeps.attention,
                                              keeps.residual, keeps.gate_up)
                   : layer->forward(h, pos, cache, i);
  }
  if (cache) cache->length += ids.size(1);
  return model->norm(h);
}

void LlamaForCausalLMImpl::untie_head() {
  if (!config.tie_word_embeddings) return;
  model->embed_tokens->untie();
  config.tie_word_embeddings = false;
}

void check_rope_interpolation(const RopeConfig& rope, double factor, const std::string& where) {
  if (factor > 1 && rope.type != RopeType::Default) {
    throw ConfigError(where + ": linear RoPE interpolation by " + std::to_string(factor) +
                      " needs plain RoPE, but the model already scales its RoPE another way "
                      "(hint: longlora.rope_scale: 1)");
  }
}

void LlamaForCausalLMImpl::interpolate_rope(double factor) {
  if (factor == 1.0) return;
  check_rope_interpolation(config.rope, factor, "RoPE interpolation");
  config.rope.type = RopeType::Linear;
  config.rope.factor = factor;
  inv_freq = rope_inv_freq(config).to(inv_freq.device());
}

void LlamaForCausalLMImpl::use_s2(double group_ratio, S2Shift shift) {
  for (auto& layer : *model->layers) {
    auto& attn = *layer->as<DecoderLayerImpl>()->self_attn;
    attn.s2_ratio = group_ratio;
    attn.s2_shift = shift;
  }
}

torch::Tensor LlamaForCausalLMImpl::logits(const torch::Tensor& hidden) {
  return lm_head(hidden);
}

Projections LlamaForCausalLMImpl::projections() const {
  Projections out;
  for (const auto& m : *model->layers) {
    auto* layer = m->as<DecoderLayerImpl>();
    const auto& a = layer->self_attn;
    const auto& f = layer->mlp;
    for (const auto& p :
         {a->q_proj, a->k_proj, a->v_proj, a->o_proj, f->gate_proj, f->up_proj, f->down_proj}) {
      out.push_back(p);
    }
  }
  return out;
}

AdapterSites LlamaForCausalLMImpl::adapter_sites() const {
  AdapterSites sites{projections(), {}};
  int64_t index = 0;
  for (const auto& m : *model->layers) {
    Mlp mlp = m->as<DecoderLayerImpl>()->mlp;
    sites.ffns.push_back(
        {"model.layers." + std::to_string(index++) + ".mlp", mlp->down_proj->out_features,
         mlp->down_proj->in_features, mlp->down_proj->device(),
         [mlp](std::shared_ptr<FfnAdapterImpl> a) mutable { mlp->attach(std::move(a)); },
         [mlp] { return mlp->adapter; },
         [mlp](const torch::Tensor& x) mutable { return mlp->forward_plain(x); }});
  }
  return sites;
}

std::vector<std::pair<std::string, torch::Tensor>> LlamaForCausalLMImpl::checkpoint_tensors() {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& item : named_parameters(/*recurse=*/true)) {
    if (item.key().find(".adapter.") != std::string::npos) continue;
    if (config.tie_word_embeddings && item.key() == "lm_head.weight") continue;
    out.emplace_back(item.key(), item.value());
  }
  return out;
}

Projections LlamaForCausalLMImpl::quantized_projections() const {
  Projections out;
  for (const auto& p : projections())
    if (!p->weight.defined()) out.push_back(p);
  return out;
}

LlamaConfig builtin_shape(const std::string& name) {
  LlamaConfig c;
  c.rms_norm_eps = 1e-5;
  if (name == "tiny") {
    c.hidden_size = 64, c.intermediate_size = 128, c.num_hidden_layers = 2,
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2, c.head_dim = 16, c.vocab_size = 320, c.tie_word_embeddings = true;
  } else if (name == "llama-1b") {
    c.hidden_size = 2048, c.intermediate_size = 8192, c.num_hidden_layers = 16,
    c.num_attention_heads = 32;
    c.num_key_value_heads = 8, c.head_dim = 64, c.vocab_size = 128256, c.tie_word_embeddings = true;
    c.rope = {RopeType::Llama3, 500000.0, 32.0, 1.0, 4.0, 8192};
  } else if (name == "llama2-7b") {
    c.hidden_size = 4096, c.intermediate_size = 11008, c.num_hidden_layers = 32,
    c.num_attention_heads = 32;
    c.num_key_value_heads = 32, c.head_dim = 128, c.vocab_size = 32000;
  } else if (name == "llama3-8b") {
    c.hidden_size = 4096, c.intermediate_size = 14336, c.num_hidden_layers = 32,
    c.num_attention_heads = 32;
    c.num_key_value_heads = 8, c.head_dim = 128, c.vocab_size = 128256;
    c.rope.theta = 500000.0;
  } else {
    throw ConfigError("shape '" + name +
                      "' is not built in (tiny, llama-1b, llama2-7b, llama3-8b)");
  }
  c.max_position_embeddings = 131072;
  return c;
}

LlamaForCausalLM random_llama(const LlamaConfig& config,
                              torch::Device device,
                              torch::Dtype dtype,
                              uint64_t seed,
                              Quantize quantize) {
  LlamaForCausalLM model(config, torch::dtype(dtype).device(device), quantize);
  torch::NoGradGuard no_grad;
  torch::manual_seed(seed);
  for (auto& [name, t] : model->checkpoint_tensors()) {
    if (t.dim() == 1) {
      t.fill_(name.size() > 5 && name.substr(name.size() - 5) == ".bias" ? 0.0 : 1.0);
    } else {
      t.normal_(0.0, 0.02);  // drawn where the tensor lives: no host copy of a large model
    }
  }
  for (auto& p : model->quantized_projections())
    p->quantize(torch::empty({p->out_features, p->in_features}, p->options).normal_(0.0, 0.02));
  return model;
}

LlamaForCausalLM load_llama(const std::string& dir,
                            torch::Device device,
                            torch::Dtype dtype,
                            Quantize quantize) {
  const LlamaConfig config = load_llama_config(dir);
  SafetensorsCheckpoint checkpoint(dir);
  LlamaForCausalLM model(config, torch::dtype(dtype).device(device), quantize);

  const auto entries = checkpoint.entries();
  TensorBinding binding(checkpoint);
  // A quantized projection's weight is read into a dense tensor of its own, then quantized.
  auto wanted = model->checkpoint_tensors();
  std::map<std::string, Projection> quantized;
  for (auto& p : model->quantized_projections()) {
    const auto name = p->name + ".weight";
    quantized.emplace(name, p);
    wanted.emplace_back(name, torch::empty({p->out_features, p->in_features}, torch::kMeta));
  }
  for (const auto& [name, t] : wanted) {
    if (!binding.expect(name, t.sizes())) continue;
    const StDtype dtype = entries.at(name)->dtype;
    if (!torch::isFloatingType(to_torch_dtype(dtype))) {
      binding.problem("tensor '" + name + "' has dtype " + st_dtype_name(dtype) +
                      ", expected F32, F16 or BF16");
    }
  }
  binding.report_unexpected("", [&](const std::string& name) {
    const bool derived = name.size() > 13 && name.substr(name.size() - 13) == "rotary_emb.inv_freq";
    return derived || (config.tie_word_embeddings && name == "lm_head.weight");
  });
  binding.check("checkpoint '" + dir + "' does not match its config.json",
                "is config.json from the same model as the weights?");

  // With a cold page cache the disk is the bottleneck: one thread reads the files
  // sequentially at the disk's speed while the others copy tensors in file order behind it.
  std::vector<size_t> order(wanted.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return checkpoint.position(wanted[a].first) < checkpoint.position(wanted[b].first);
  });
  std::vector<std::future<void>> jobs;
  jobs.push_back(std::async(std::launch::async, [&] { checkpoint.read_ahead(); }));
  const size_t workers = std::min<size_t>(kLoadThreads, wanted.size());
  for (size_t w = 0; w < workers; ++w) {
    jobs.push_back(std::async(std::launch::async, [&, w] {
      torch::NoGradGuard no_grad;
      for (size_t i = w; i < order.size(); i += workers) {
        const auto& [name, t] = wanted[order[i]];
        const auto q = quantized.find(name);
        if (q == quantized.end()) {
          t.copy_(checkpoint.tensor(name));
        } else {
          q->second->quantize(checkpoint.tensor(name).to(device, dtype));
        }
      }
    }));
  }
  for (auto& job : jobs) job.get();
  return model;
}

}  // namespace lorafit
