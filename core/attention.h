// The attention maths of the model: grouped-KV causal attention (with a KV cache), masked
// attention, and LongLoRA's shifted sparse attention (S2-Attn), on compat::sdpa.
#pragma once

#include <torch/torch.h>

#include <cstdint>

namespace lorafit {

namespace compat {
struct AttentionState;
}

/// How S2-Attn shifts the second half of the heads (see s2_attention).
enum class S2Shift { Roll, NoWrap, None };

/// Each KV head serving heads/kv_heads consecutive query heads, as transformers' repeat_kv.
/// x: [B, KV, T, D] -> [B, H, T, D]
torch::Tensor repeat_kv(const torch::Tensor& x, int64_t heads);

/// Causal self-attention with grouped KV heads, where query i sits at position offset + i and
/// sees keys 0 .. offset + i (the keys before it are a KV cache).
/// q: [B, H, Tq, D], k, v: [B, KV, Tk, D] with Tk = offset + Tq; returns [B, H, Tq, D].
torch::Tensor causal_attention(const torch::Tensor& q,
                               const torch::Tensor& k,
                               const torch::Tensor& v,
                               double scale,
                               int64_t offset = 0);

/// Causal attention within each record of packed rows: query i sees the keys of its own
/// record up to i. On CUDA with flash attention (LibTorch 2.x, bf16/f16) the records run as
/// variable-length sequences, without a mask; elsewhere a block-diagonal causal mask.
/// q: [B, H, T, D], k, v: [B, KV, T, D] after RoPE; segment_ids: [B, T] int64 (Segments::ids),
/// cu_seqlens: [S + 1] int32, max_len: the longest record -> [B, H, T, D]
torch::Tensor record_attention(const torch::Tensor& q,
                               const torch::Tensor& k,
                               const torch::Tensor& v,
                               double scale,
                               const torch::Tensor& segment_ids,
                               const torch::Tensor& cu_seqlens,
                               int64_t max_len);

/// Causal attention within each record through a fused kernel that keeps its state, for a
/// checkpointed layer that keeps the attention (train.checkpoint_keep: [attention]): cuDNN's
/// for whole rows where SDPA runs it, else flash attention's (has_varlen_flash(q)). Run
/// without gradients (the layer's first forward) it fills `kept` with the forward's state;
/// given that state (the recomputation, on the same q, k, v) it returns the same output,
/// differentiable, without running the forward again. cu_seqlens: [S + 1] int32 over the B*T
/// tokens, max_len the longest record; undefined: each row is one record of T tokens.
/// q: [B, H, T, D], k, v: [B, KV, T, D] after RoPE -> [B, H, T, D]
torch::Tensor kept_attention(const torch::Tensor& q,
                             const torch::Tensor& k,
                             const torch::Tensor& v,
                             double scale,
                             const torch::Tensor& cu_seqlens,
                             int64_t max_len,
                             compat::AttentionState& kept);

/// Attention of every query over the keys `mask` allows ([Tq, Tk] or broadcastable to
/// [B, H, Tq, Tk], bool, true where allowed; every query must be allowed some key).
/// q, k, v: [B, H, T, D] with as many heads each.
torch::Tensor masked_attention(const torch::Tensor& q,
                               const torch::Tensor& k,
                               const torch::Tensor& v,
                               const torch::Tensor& mask,
                               double scale);

/// LongLoRA's shifted sparse attention (S2-Attn, for training): causal attention within
/// groups of `group` consecutive tokens, and for the second half of the heads within groups
/// shifted by group/2, so that information crosses the group borders. Roll (the paper's)
/// rolls those heads' sequence by -group/2, so their last group wraps around to the first
/// tokens, and rolls the output back; NoWrap (LongLoRA's later flash path) cuts their sequence
/// at group/2, 3*group/2, ..., its first and last segments half as long; None shifts nothing.
/// Where a wrapped group could see padding (keep false), those keys are masked. In packed
/// rows (segment_ids defined) a group's tokens see the earlier ones of their own record only.
/// A length that does not split into groups is a ConfigError with the numbers.
/// q: [B, H, L, D], k, v: [B, KV, L, D] after RoPE, keep: [B, L] bool, undefined when no row
/// is padded (then nothing is masked and flash attention can run); segment_ids: [B, L] int64
/// (Segments::ids) or undefined -> [B, H, L, D]
torch::Tensor s2_attention(const torch::Tensor& q,
                           const torch::Tensor& k,
                           const torch::Tensor& v,
                           double scale,
                           int64_t group,
                           S2Shift shift,
                           const torch::Tensor& keep = {},
                           const torch::Tensor& segment_ids = {});

}  // namespace lorafit
