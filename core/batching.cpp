#include "core/batching.h"

#include <algorithm>

namespace lorafit {

Batch collate(const std::vector<BatchPart>& parts, torch::Device device, size_t pad_multiple) {
  size_t t = 0;
  int64_t b = 0;
  for (const auto& part : parts) {
    for (auto r : part.rows) t = std::max(t, (*part.examples)[r].input_ids.size());
    b += static_cast<int64_t>(part.rows.size());
  }
  t = (t + pad_multiple - 1) / pad_multiple * pad_multiple;
  std::vector<int64_t> ids(b * t, 0), labels(b * t, kIgnoreLabel);
  std::vector<uint8_t> keep(b * t, 0);
  Batch out;
  int64_t i = 0;
  for (const auto& part : parts) {
    for (auto r : part.rows) {
      const auto& ex = (*part.examples)[r];
      std::copy(ex.input_ids.begin(), ex.input_ids.end(), ids.begin() + i * t);
      std::copy(ex.labels.begin(), ex.labels.end(), labels.begin() + i * t);
      std::fill_n(keep.begin() + i * t, ex.input_ids.size(), 1);
      out.tokens += static_cast<int64_t>(ex.input_ids.size());
      ++i;
    }
  }
  const auto ti = static_cast<int64_t>(t);
  // copy=true: on the CPU a plain .to() would keep viewing the local vectors. To a GPU through
  // pinned memory, without waiting: a pageable copy would wait for all the queued work.
  auto to_device = [&](void* data, torch::Dtype from, torch::Dtype to,
                       std::vector<int64_t> shape = {}) {
    if (shape.empty()) shape = {b, ti};
    const auto host = torch::from_blob(data, shape, from);
    return device.is_cuda() ? host.pin_memory().to(device, to, /*non_blocking=*/true)
                            : host.to(device, to, false, true);
  };
  out.ids = to_device(ids.data(), torch::kInt64, torch::kInt64);
  out.labels = to_device(labels.data(), torch::kInt64, torch::kInt64);
  out.keep = to_device(keep.data(), torch::kUInt8, torch::kBool);
  bool packed = false;
  for (const auto& part : parts)
    for (auto r : part.rows) packed = packed || (*part.examples)[r].segments.size() > 1;
  if (!packed) return out;
  // Each row's records in order, then its padding as one record more.
  std::vector<int64_t> positions(b * t, 0), segment(b * t, 0);
  std::vector<int32_t> cu{0};
  int64_t record = -1;
  auto add = [&](int64_t at, int64_t n) {
    ++record;
    for (int64_t j = 0; j < n; ++j) positions[at + j] = j, segment[at + j] = record;
    cu.push_back(cu.back() + static_cast<int32_t>(n));
    out.segments.max_len = std::max(out.segments.max_len, n);
  };
  i = 0;
  for (const auto& part : parts) {
    for (auto r : part.rows) {
      const auto& ex = (*part.examples)[r];
      int64_t at = i * ti;
      if (ex.segments.empty()) {
        add(at, static_cast<int64_t>(ex.input_ids.size()));
        at += static_cast<int64_t>(ex.input_ids.size());
      }
      for (const auto n : ex.segments) add(at, n), at += n;
      if (at < (i + 1) * ti) add(at, (i + 1) * ti - at);
      ++i;
    }
  }
  out.segments.positions = to_device(positions.data(), torch::kInt64, torch::kInt64);
  out.segments.ids = to_device(segment.data(), torch::kInt64, torch::kInt64);
  out.segments.cu_seqlens =
      to_device(cu.data(), torch::kInt32, torch::kInt32, {static_cast<int64_t>(cu.size())});
  return out;
}

int64_t target_count(const std::vector<Example>& examples, const std::vector<size_t>& rows) {
  int64_t n = 0;
  for (auto r : rows) {
    const auto& l = examples[r].labels;
    n += std::count_if(l.begin() + 1, l.end(), [](int64_t x) { return x != kIgnoreLabel; });
  }
  return n;
}

std::vector<std::vector<BatchPart>> group_by_length(std::vector<BatchPart> parts) {
  auto length = [](const BatchPart& p) {
    size_t t = 0;
    for (auto r : p.rows) t = std::max(t, (*p.examples)[r].input_ids.size());
    return t;
  };
  std::stable_sort(parts.begin(), parts.end(),
                   [&](const auto& a, const auto& b) { return length(a) > length(b); });
  std::vector<std::vector<BatchPart>> groups;
  size_t group_length = 0;
  for (auto& p : parts) {
    if (groups.empty() || length(p) * 2 < group_length) {
      groups.emplace_back();
      group_length = length(p);
    }
    groups.back().push_back(std::move(p));
  }
  return groups;
}

}  // namespace lorafit
