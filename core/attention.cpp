#include "core/attention.h"

#include "core/compat.h"
#include "core/errors.h"

namespace lorafit {

torch::Tensor repeat_kv(const torch::Tensor& x, int64_t heads) {
  const auto b = x.size(0), kv = x.size(1), t = x.size(2), d = x.size(3);
  if (kv == heads) return x;
  return x.unsqueeze(2).expand({b, kv, heads / kv, t, d}).reshape({b, heads, t, d});
}

torch::Tensor causal_attention(const torch::Tensor& q,
                               const torch::Tensor& k,
                               const torch::Tensor& v,
                               double scale,
                               int64_t offset) {
  const auto heads = q.size(1), tq = q.size(-2), tk = k.size(-2);
  // SDPA's is_causal aligns queries with the first keys, right only when there is no cache; a
  // single new query sees every key and needs no mask; anything else gets an explicit one.
  torch::Tensor mask;  // [Tq, Tk] bool, true where attending is allowed
  if (offset > 0 && tq > 1) {
    auto qpos = torch::arange(offset, offset + tq, torch::dtype(torch::kInt64).device(q.device()));
    mask = qpos.unsqueeze(1) >=
           torch::arange(tk, torch::dtype(torch::kInt64).device(q.device())).unsqueeze(0);
  }
  // Flash attention (CUDA, bf16/f16) alone reads grouped KV heads in place; any other backend
  // would fall back to the slow math kernel with them, so the heads are expanded there instead.
  const bool flash_gqa =
      k.size(1) != heads && q.is_cuda() && !mask.defined() && q.size(-1) <= 256 &&
      (q.scalar_type() == torch::kBFloat16 || q.scalar_type() == torch::kFloat16);
  const auto kk = flash_gqa ? k : repeat_kv(k, heads), vv = flash_gqa ? v : repeat_kv(v, heads);
  return compat::sdpa(q, kk, vv, mask, offset == 0 && tq > 1, scale, flash_gqa);
}

namespace {

// [B, H, T, D] <-> [B*T, H, D]: the projections' layout, so usually a view.
torch::Tensor tokens(const torch::Tensor& x) {
  return x.transpose(1, 2).reshape({x.size(0) * x.size(2), x.size(1), x.size(3)});
}
torch::Tensor from_tokens(const torch::Tensor& y, int64_t b) {
  return y.view({b, y.size(0) / b, y.size(1), y.size(2)}).transpose(1, 2);
}

}  // namespace

torch::Tensor record_attention(const torch::Tensor& q,
                               const torch::Tensor& k,
                               const torch::Tensor& v,
                               double scale,
                               const torch::Tensor& segment_ids,
                               const torch::Tensor& cu_seqlens,
                               int64_t max_len) {
  const auto b = q.size(0), heads = q.size(1), t = q.size(2);
  if (compat::has_varlen_flash(q)) {
    return from_tokens(
        compat::varlen_flash(tokens(q), tokens(k), tokens(v), cu_seqlens, max_len, scale), b);
  }
  const auto causal =
      torch::ones({t, t}, torch::dtype(torch::kBool).device(q.device())).tril();  // [T, T]
  const auto same = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1);         // [B, T, T]
  return compat::sdpa(q, repeat_kv(k, heads), repeat_kv(v, heads),
                      (causal.unsqueeze(0) & same).unsqueeze(1), /*causal=*/false, scale);
}

torch::Tensor kept_attention(const torch::Tensor& q,
                             const torch::Tensor& k,
                             const torch::Tensor& v,
                             double scale,
                             const torch::Tensor& cu_seqlens,
                             int64_t max_len,
                             compat::AttentionState& kept) {
  // With gradients on and nothing kept there is nothing to keep for: a plain differentiable
  // forward, never an output the backward would not reach. The kept output's shape says which
  // kernel made it.
  const bool replay = kept.defined() || torch::GradMode::is_enabled();
  // Whole rows run the kernel SDPA runs for them when that is cuDNN's (Hopper), so that
  // keeping changes no number; packed records, and whole rows elsewhere, run varlen flash.
  if (kept.defined() ? kept.out.dim() == 4
                     : !cu_seqlens.defined() && compat::sdpa_runs_cudnn(q, k, v, scale)) {
    if (replay) return compat::cudnn_causal(q, k, v, scale, kept);
    kept = compat::cudnn_causal_forward(q, k, v, scale);
    return kept.out;
  }
  const auto b = q.size(0), t = q.size(2);
  auto cu = cu_seqlens;  // [S + 1] int32
  if (!cu.defined()) {
    cu = torch::arange(0, (b + 1) * t, t, torch::dtype(torch::kInt32).device(q.device()));
    max_len = t;
  }
  if (replay) {
    return from_tokens(
        compat::varlen_flash(tokens(q), tokens(k), tokens(v), cu, max_len, scale, kept), b);
  }
  kept = compat::varlen_flash_forward(tokens(q), tokens(k), tokens(v), cu, max_len, scale);
  return from_tokens(kept.out, b);
}

torch::Tensor masked_attention(const torch::Tensor& q,
                               const torch::Tensor& k,
                               const torch::Tensor& v,
                               const torch::Tensor& mask,
                               double scale) {
  return compat::sdpa(q, k, v, mask, /*causal=*/false, scale);
}

namespace {

// [B, h, L, D] <-> [B * L/G, h, G, D]: each group of G tokens becomes a batch row.
torch::Tensor to_groups(const torch::Tensor& x, int64_t g) {
  const auto b = x.size(0), h = x.size(1), l = x.size(2), d = x.size(3);
  return x.view({b, h, l / g, g, d}).transpose(1, 2).reshape({b * (l / g), h, g, d});
}
torch::Tensor from_groups(const torch::Tensor& y, int64_t b) {
  const auto n = y.size(0) / b, h = y.size(1), g = y.size(2), d = y.size(3);
  return y.view({b, n, h, g, d}).transpose(1, 2).reshape({b, h, n * g, d});
}

// Causal attention within each group of g tokens. keep: [B, L] or undefined; segment_ids:
// [B, L] or undefined (then every token of a row is one record's).
torch::Tensor grouped_attention(const torch::Tensor& q,
                                const torch::Tensor& k,
                                const torch::Tensor& v,
                                double scale,
                                int64_t g,
                                const torch::Tensor& keep,
                                const torch::Tensor& segment_ids) {
  const auto b = q.size(0);
  if (!keep.defined() && !segment_ids.defined()) {
    return from_groups(causal_attention(to_groups(q, g), to_groups(k, g), to_groups(v, g), scale),
                       b);
  }
  const auto causal =
      torch::ones({g, g}, torch::dtype(torch::kBool).device(q.device())).tril();  // [G, G]
  torch::Tensor mask;                                                             // [B*n, G, G]
  if (segment_ids.defined()) {
    // A row's padding is a record of its own: no real query sees it, and none is left blind.
    const auto sg = segment_ids.reshape({-1, g});  // [B*n, G]
    mask = causal.unsqueeze(0) & (sg.unsqueeze(2) == sg.unsqueeze(1));
  } else {
    // A real query sees no padded key; a padded query (its output unused) sees every earlier
    // key of its group, so that no row is fully masked.
    const auto kg = keep.reshape({-1, g});  // [B*n, G]
    mask = causal.unsqueeze(0) & (kg.unsqueeze(1) | kg.logical_not().unsqueeze(2));
  }
  const auto heads = q.size(1);
  return from_groups(masked_attention(to_groups(q, g), repeat_kv(to_groups(k, g), heads),
                                      repeat_kv(to_groups(v, g), heads), mask.unsqueeze(1), scale),
                     b);
}

}  // namespace

torch::Tensor s2_attention(const torch::Tensor& q,
                           const torch::Tensor& k,
                           const torch::Tensor& v,
                           double scale,
                           int64_t group,
                           S2Shift shift,
                           const torch::Tensor& keep,
                           const torch::Tensor& segment_ids) {
  const auto& seg = segment_ids;
  const auto heads = q.size(1), kv_heads = k.size(1), l = q.size(2);
  if (group < 1 || l % group != 0 || (shift != S2Shift::None && group % 2 != 0)) {
    throw ConfigError("S2-Attn: a sequence of " + std::to_string(l) +
                      " tokens does not split into groups of " + std::to_string(group) +
                      (shift != S2Shift::None ? " (an even size, for the half-group shift)" : "") +
                      " (hint: make data.max_seq_len a multiple of 1 / longlora.group_ratio "
                      "with packing: concat)");
  }
  if (shift == S2Shift::None) return grouped_attention(q, k, v, scale, group, {}, seg);
  if (heads % 2 != 0) {
    throw ConfigError("S2-Attn shifts half of the heads, but the model has " +
                      std::to_string(heads) + " (hint: longlora.shift: none)");
  }
  // Heads [0, H/2) keep the groups, heads [H/2, H) shift; grouped KV heads split with them
  // when they split evenly (query head h reads KV head h * KV / H), else they are repeated.
  const bool split_kv = kv_heads % 2 == 0;
  const auto kk = split_kv ? k : repeat_kv(k, heads);
  const auto vv = split_kv ? v : repeat_kv(v, heads);
  const auto kh = kk.size(1) / 2, h = heads / 2, half = group / 2;
  const auto qa = q.narrow(1, 0, h), qb = q.narrow(1, h, h);
  const auto ka = kk.narrow(1, 0, kh), kb = kk.narrow(1, kh, kh);
  const auto va = vv.narrow(1, 0, kh), vb = vv.narrow(1, kh, kh);
  // Right padding only ever follows the real tokens, so plain causal groups never see it.
  const auto unshifted = grouped_attention(qa, ka, va, scale, group, {}, seg);
  // The tokens' record ids, rolled or cut as the shifted heads' tokens are (along dim 1).
  auto segs = [&](auto&& cut) { return seg.defined() ? cut(seg, 1) : torch::Tensor(); };
  torch::Tensor shifted;
  if (shift == S2Shift::Roll) {
    auto roll = [&](const torch::Tensor& x, int64_t dim) { return x.roll(-half, dim); };
    shifted = grouped_attention(roll(qb, 2), roll(kb, 2), roll(vb, 2), scale, group,
                                keep.defined() ? roll(keep, 1) : torch::Tensor(), segs(roll))
                  .roll(half, 2);
  } else {
    // Spans [0, G/2), [G/2, 3G/2), ..., [L - G/2, L): the two half-length ends are one batch
    // of groups of G/2, the middle one of groups of G.
    const auto b = q.size(0);
    auto ends = [&](const torch::Tensor& x, int64_t dim) {
      return torch::cat({x.narrow(dim, 0, half), x.narrow(dim, l - half, half)}, 0);
    };
    const auto e =
        grouped_attention(ends(qb, 2), ends(kb, 2), ends(vb, 2), scale, half, {}, segs(ends));
    std::vector<torch::Tensor> parts{e.narrow(0, 0, b)};
    if (l > group) {
      auto mid = [&](const torch::Tensor& x, int64_t dim) {
        return x.narrow(dim, half, l - group);
      };
      parts.push_back(
          grouped_attention(mid(qb, 2), mid(kb, 2), mid(vb, 2), scale, group, {}, segs(mid)));
    }
    parts.push_back(e.narrow(0, b, b));
    shifted = torch::cat(parts, 2);
  }
  return torch::cat({unshifted, shifted}, 1);
}

}  // namespace lorafit
