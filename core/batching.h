// Batches of training rows: examples collated into padded tensors on the device, and the
// fused step's micro-batches grouped by length.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <vector>

#include "core/datasets.h"
#include "core/llama.h"

namespace lorafit {

/// A micro-batch on the model's device.
struct Batch {
  torch::Tensor ids;     // [B, T] int64, right-padded with 0
  torch::Tensor labels;  // [B, T] int64, -100 where nothing is learned
  int64_t tokens = 0;    // real (unpadded) tokens
  torch::Tensor keep;    // [B, T] bool, the real tokens; undefined: no padding
  Segments segments;     // the records of packed rows; undefined: a record per row
};

/// Rows of one job's examples in a batch.
struct BatchPart {
  const std::vector<Example>* examples = nullptr;
  std::vector<size_t> rows;
  size_t job = 0;  // whose rows (the job's index in its run)
};

/// Right-pads the parts' rows, in order, to the longest, rounded up to a multiple of
/// `pad_multiple` (S2-Attn's groups must split every batch's length). Where a row holds
/// several records (Example::segments), the batch gets their Segments.
Batch collate(const std::vector<BatchPart>& parts, torch::Device device, size_t pad_multiple = 1);

/// Targets that count in the loss: labels after the first position that are not ignored.
int64_t target_count(const std::vector<Example>& examples, const std::vector<size_t>& rows);

/// The micro-batches of a fused step, grouped so that few rows pad far beyond their length:
/// longest first, a micro-batch joins the group while the group's length is at most twice its
/// own. Each group is one forward pass (one base GEMM per projection for all its rows).
std::vector<std::vector<BatchPart>> group_by_length(std::vector<BatchPart> parts);

}  // namespace lorafit
