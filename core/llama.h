// The LLaMA decoder as transformers computes it (modeling_llama.py): RMSNorm, RoPE in the
// rotate_half convention on HF-layout weights, grouped-query attention, SwiGLU MLP, tied or
// untied head; with the few differences of Mistral, Qwen2 (q, k, v biases) and Qwen3 (RMSNorm
// on each head of q and k). Module and parameter names equal the checkpoint's keys, so
// loading is by name.
#pragma once

#include <torch/torch.h>

#include <limits>
#include <string>

#include "core/attention.h"
#include "core/hf_config.h"
#include "core/projection.h"

namespace lorafit {

struct RMSNormImpl : torch::nn::Module {
  RMSNormImpl(int64_t dim, double eps, const torch::TensorOptions& options);
  /// x: [..., C]; normalises in fp32, casts back, then scales (transformers' order).
  torch::Tensor forward(const torch::Tensor& x);

  torch::Tensor weight;  // [C]
  double eps;
};
TORCH_MODULE(RMSNorm);

struct EmbeddingImpl : torch::nn::Module {
  EmbeddingImpl(int64_t vocab, int64_t dim, const torch::TensorOptions& options);
  /// ids: [B, T] -> [B, T, C]
  torch::Tensor forward(const torch::Tensor& ids);

  /// Gives the embedding its own copy of the weight, which a tied head may share.
  void untie();

  torch::Tensor weight;  // [V, C]
};
TORCH_MODULE(Embedding);

/// Records packed into the rows of a batch (data.packing: true): each token attends to the
/// earlier tokens of its own record only, and its RoPE position counts from the record's
/// start, so a packed row computes what its records compute alone. Undefined tensors: each
/// row is one record.
struct Segments {
  torch::Tensor positions;   // [B, T] int64: each token's position in its record
  torch::Tensor ids;         // [B, T] int64: its record's number in the batch, ascending in row
                             // order (a row's padding is one record more)
  torch::Tensor cu_seqlens;  // [S + 1] int32: where each record starts among the B*T tokens
                             // (flash attention's variable-length form)
  int64_t max_len = 0;       // of the longest record

  bool defined() const { return ids.defined(); }
};

/// What every layer's attention knows of the positions: the rotary angles' cos and sin in the
/// activations' dtype ([T, head_dim], or [B, T, head_dim] for packed rows), which positions
/// are real tokens (keep: [B, T] bool, undefined when no row is padded; S2-Attn masks padded
/// keys with it), and the records of packed rows.
struct Positions {
  torch::Tensor cos;
  torch::Tensor sin;
  torch::Tensor keep;
  Segments segments;
};

/// Keys and values of the positions already processed, for incremental decoding.
struct KVCache {
  std::vector<torch::Tensor> k;  // per layer [B, KV, T, D], after RoPE
  std::vector<torch::Tensor> v;  // per layer [B, KV, T, D]
  int64_t length = 0;            // T
};

struct AttentionImpl : torch::nn::Module {
  AttentionImpl(const LlamaConfig& c,
                const std::string& prefix,
                const torch::TensorOptions& o,
                Quantize quantize = Quantize::None);
  /// x: [B, T, C] -> [B, T, C]. With a cache, x holds the positions after the cached ones,
  /// and this layer's keys and values are appended to it. With `kept`, flash attention keeps
  /// its state there or reads it back (kept_attention); `value_needed` as
  /// ProjectionImpl::forward's, for o_proj.
  torch::Tensor forward(const torch::Tensor& x,
                        const Positions& pos,
                        KVCache* cache = nullptr,
                        size_t layer = 0,
                        compat::AttentionState* kept = nullptr,
                        bool value_needed = true);

  Projection q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
  torch::Tensor qkv_weight;  // [(H + 2 KV) * D, C]: q, k and v's weights view it; or undefined
                             // (a quantized base)
  torch::Tensor qkv_bias;    // [(H + 2 KV) * D]: their biases view it; undefined without
  RMSNorm q_norm{nullptr}, k_norm{nullptr};  // weight [D] each, Qwen3 only
  int64_t heads, kv_heads, head_dim;
  // LongLoRA: S2-Attn in training, over groups of s2_ratio * T tokens (0: full attention).
  double s2_ratio = 0.0;
  S2Shift s2_shift = S2Shift::Roll;
};
TORCH_MODULE(Attention);

struct MlpImpl : torch::nn::Module {
  MlpImpl(const LlamaConfig& c,
          const std::string& prefix,
          const torch::TensorOptions& o,
          Quantize quantize = Quantize::None);
  /// x: [B, T, C] -> [B, T, C]; `value_needed` as ProjectionImpl::forward's.
  torch::Tensor forward(const torch::Tensor& x, bool value_needed = true);
  /// The block through its projections (and their adapters), ignoring a block adapter.
  torch::Tensor forward_plain(const torch::Tensor& x, bool value_needed = true);
  /// forward_plain's two halves: the gate and up projections, x [B, T, C] -> [B, T, 2I], and
  /// SwiGLU with the down projection after them, [B, T, 2I] -> [B, T, C]; `value_needed` as
  /// ProjectionImpl::forward's.
  torch::Tensor gate_up(const torch::Tensor& x, bool value_needed = true);
  torch::Tensor down(const torch::Tensor& gate_up, bool value_needed = true);
  /// Puts a block-level adapter (MixLoRA) on this MLP, registered as "adapter"; from then on
  /// it computes the block.
  void attach(std::shared_ptr<FfnAdapterImpl> adapter);

  Projection gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
  torch::Tensor gate_up_weight;  // [2 * I, C]: gate's and up's weights view it; or undefined
  std::shared_ptr<FfnAdapterImpl> adapter;
};
TORCH_MODULE(Mlp);

/// What a checkpointed layer keeps of its first forward (train.checkpoint_keep), so that its
/// recomputation for the backward does less, for more memory per layer.
struct CheckpointKeep {
  bool attention = false;  // the fused attention's output and log-sum-exp ([B, T, H*D] +
                           // fp32 [B, H, T]): no attention forward again; CUDA bf16/f16 only
  bool residual = false;   // h + attn ([B, T, C]): no o_proj GEMM, the MLP recomputes from it
  bool gate_up = false;    // the gate and up projections' output ([B, T, 2I]): no gate/up
                           // GEMM again; in layers whose MLP has no block adapter (MixLoRA)
  static constexpr int64_t kEveryLayer = std::numeric_limits<int64_t>::max();
  /// How many layers from the first keep each ("gate_up:14"), so that a memory budget can
  /// hold part of the larger activations; the other layers recompute it.
  int64_t attention_layers = kEveryLayer, residual_layers = kEveryLayer,
          gate_up_layers = kEveryLayer;

  /// What layer `i` (from 0) keeps.
  CheckpointKeep in_layer(int64_t i) const {
    return {attention && i < attention_layers, residual && i < residual_layers,
            gate_up && i < gate_up_layers};
  }
};

/// One checkpointed layer's kept activations (llama.cpp).
struct LayerKept;

struct DecoderLayerImpl : torch::nn::Module {
  DecoderLayerImpl(const LlamaConfig& c,
                   int64_t index,
                   const torch::TensorOptions& o,
                   Quantize quantize = Quantize::None);
  /// h: [B, T, C] -> [B, T, C]
  torch::Tensor forward(const torch::Tensor& h,
                        const Positions& pos,
                        KVCache* cache = nullptr,
                        size_t layer = 0);
  /// A checkpointed layer's first forward (no gradients), keeping in `kept` what `keep` asks.
  torch::Tensor forward_keeping(const torch::Tensor& h,
                                const Positions& pos,
                                CheckpointKeep keep,
                                LayerKept& kept);
  /// A checkpointed layer's backward: recomputes the layer from h (and from what it kept) with
  /// gradients on and back-propagates `grad` ([B, T, C], the output's) into the adapters'
  /// parameters; returns h's gradient. The GEMMs whose values the backward never reads are
  /// skipped: the MLP's down projection, o_proj's when the residual was kept, and gate's and
  /// up's when their output was. A MixLoRA adapter's loss term of its own for this layer is
  /// back-propagated too.
  torch::Tensor backward_by_recomputing(const torch::Tensor& h,
                                        const Positions& pos,
                                        const torch::Tensor& grad,
                                        LayerKept& kept);

  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
  Attention self_attn{nullptr};
  Mlp mlp{nullptr};
};
TORCH_MODULE(DecoderLayer);

/// `LlamaForCausalLM.model`: embeddings, decoder layers, final norm.
struct LlamaBodyImpl : torch::nn::Module {
  LlamaBodyImpl(const LlamaConfig& c,
                const torch::TensorOptions& o,
                Quantize quantize = Quantize::None);

  Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};
  RMSNorm norm{nullptr};
};
TORCH_MODULE(LlamaBody);

struct LlamaForCausalLMImpl : torch::nn::Module {
  /// With Quantize::Nf4 the seven projections of every layer hold their weights in NF4
  /// (QLoRA); embeddings, norms and the head stay in `o`'s dtype.
  LlamaForCausalLMImpl(const LlamaConfig& c,
                       const torch::TensorOptions& o,
                       Quantize quantize = Quantize::None);

  /// ids: [B, T] -> final-normed hidden states [B, T, C]. Causal attention only, so right
  /// padding never changes the states of the real tokens before it. With a cache, ids are
  /// the positions after the cached ones, and the cache grows by T.
  /// keep: [B, T] bool, the real tokens, undefined when no row is padded (S2-Attn masks
  /// padded keys with it); segments: the records of packed rows (no cache then).
  torch::Tensor forward(const torch::Tensor& ids,
                        KVCache* cache = nullptr,
                        const torch::Tensor& keep = {},
                        const Segments& segments = {});
  /// A tied head keeps the weight and the embedding gets a copy (tie_word_embeddings turns
  /// false), so that the embedding can train while the head stays frozen (LongLoRA).
  void untie_head();
  /// Linear RoPE position interpolation by `factor` (LongLoRA): positions are divided by it.
  /// A ConfigError for a model whose RoPE is already scaled another way.
  void interpolate_rope(double factor);
  /// LongLoRA: S2-Attn with groups of group_ratio * T tokens in every layer while training
  /// (evaluation and generation keep full attention); 0 turns it off.
  void use_s2(double group_ratio, S2Shift shift);
  /// hidden: [..., C] -> logits [..., V] in the model's dtype.
  torch::Tensor logits(const torch::Tensor& hidden);
  /// cos/sin for positions start..start+T-1, in `dtype`, on the model's device.
  Positions positions(int64_t start, int64_t t, torch::Dtype dtype) const;
  /// cos/sin [B, T, D] for each token's position (at: [B, T] int64).
  Positions positions(const torch::Tensor& at, torch::Dtype dtype) const;
  /// Every projection that an adapter may target (the seven per layer, in layer order).
  Projections projections() const;
  /// The projections and the MLP blocks, where adapter strategies attach.
  AdapterSites adapter_sites() const;
  /// The checkpoint keys this model reads into dense tensors, with their tensors (tied head
  /// and quantized projections excluded).
  std::vector<std::pair<std::string, torch::Tensor>> checkpoint_tensors();
  /// The projections built quantized (no dense weight; none without quantize).
  Projections quantized_projections() const;

  LlamaConfig config;
  /// Recompute each decoder layer in the backward pass instead of keeping its activations
  /// (training only): less memory for one more forward.
  bool checkpoint_layers = false;
  /// What the recomputation need not compute again (train.checkpoint_keep).
  CheckpointKeep checkpoint_keep;
  LlamaBody model{nullptr};
  Projection lm_head{nullptr};
  torch::Tensor inv_freq;  // [head_dim / 2] f32, not a checkpoint tensor
};
TORCH_MODULE(LlamaForCausalLM);

/// Refuses linear RoPE interpolation by `factor` > 1 (LongLoRA) of a model whose RoPE is already
/// scaled another way: a ConfigError naming `where`.
void check_rope_interpolation(const RopeConfig& rope, double factor, const std::string& where);

/// Inverse RoPE frequencies [head_dim / 2] in f32, computed in transformers' op order
/// (default, linear and llama3 types).
torch::Tensor rope_inv_freq(const LlamaConfig& c);

/// The config of a built-in shape: tiny, llama-1b (Llama-3.2-1B), llama2-7b, llama3-8b.
/// ConfigError listing the shapes otherwise.
LlamaConfig builtin_shape(const std::string& name);

/// A model with random weights (N(0, 0.02), norms 1, biases 0, as transformers initialises), for
/// benchmarks that need no checkpoint; a quantized projection's are drawn in `dtype` one at a
/// time and quantized.
LlamaForCausalLM random_llama(const LlamaConfig& config,
                              torch::Device device,
                              torch::Dtype dtype,
                              uint64_t seed,
                              Quantize quantize = Quantize::None);

/// Builds the model from a Hugging Face folder (config.json + safetensors) onto `device` with
/// frozen base weights in `dtype`. Missing, unexpected and mis-shaped tensors are all reported
/// at once by name. With Quantize::Nf4 each projection weight is read in `dtype`, quantized on
/// `device` and dropped: the dense model never sits there whole.
LlamaForCausalLM load_llama(const std::string& dir,
                            torch::Device device,
                            torch::Dtype dtype,
                            Quantize quantize = Quantize::None);

}  // namespace lorafit
