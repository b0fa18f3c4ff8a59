// safetensors files as LibTorch tensors: read by mmap (one file, or shards with
// model.safetensors.index.json) and written atomically (one file, or shards with an index).
#pragma once

#include <torch/torch.h>

#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "core/safetensors_format.h"
#include "core/torch_save_format.h"

namespace lorafit {

/// Named tensors, as a safetensors file holds them.
using TensorMap = std::map<std::string, torch::Tensor>;

/// One safetensors file, mapped read-only (copy-on-write) for as long as any tensor from it
/// lives.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);

  const std::string& path() const { return path_; }
  const StHeader& header() const { return header_; }
  const StEntry* find(const std::string& name) const;
  /// A CPU tensor viewing the mapped bytes (no copy). Throws ModelMismatchError if absent.
  torch::Tensor tensor(const std::string& name) const;

 private:
  struct Mapping;
  std::string path_;
  std::shared_ptr<Mapping> map_;
  StHeader header_;
  std::map<std::string, size_t> index_;  // name -> position in header_.entries
};

/// The tensors of a checkpoint folder: model.safetensors, or the shards that
/// model.safetensors.index.json lists.
class SafetensorsCheckpoint {
 public:
  explicit SafetensorsCheckpoint(const std::string& dir);

  /// Every tensor name with its entry (dtype, shape), in name order.
  std::map<std::string, const StEntry*> entries() const;
  torch::Tensor tensor(const std::string& name) const;
  /// Total bytes of tensor data.
  uint64_t data_bytes() const;
  /// (shard index, byte offset) of a tensor: the order in which reading is sequential.
  std::pair<size_t, uint64_t> position(const std::string& name) const;
  /// Reads every shard start to end in large blocks, so the page cache fills at the disk's
  /// sequential speed while (or before) tensors are copied out of the mapping.
  void read_ahead() const;

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const SafetensorsFile*> owner_;
};

/// The one place where a loader checks a file's named tensors against what the model or the
/// adapter expects. The loader says which names it expects (with their shapes where it knows
/// them); missing, mis-shaped and, at the end, unexpected tensors are collected, and check()
/// reports them all in one ModelMismatchError, so the user sees every problem at once.
class TensorBinding {
 public:
  explicit TensorBinding(const TensorMap& held);
  explicit TensorBinding(const SafetensorsCheckpoint& held);

  /// Whether the file holds `name` with `shape`; records "missing tensor 'X' [shape]" or
  /// "tensor 'X' has shape [a], expected [b]" otherwise.
  bool expect(const std::string& name, torch::IntArrayRef shape);
  /// Whether the file holds `name` at all; its shape is the caller's to judge.
  bool expect(const std::string& name);
  /// A problem only the caller can see (a shape that depends on another tensor, a dtype).
  void problem(std::string text);
  /// Records "unexpected tensor 'X' [shape]" (or "tensor 'X' <why> (shape [..])") for every
  /// held tensor not expected and not excused by `allowed`.
  void report_unexpected(const std::string& why = "",
                         const std::function<bool(const std::string&)>& allowed = {});
  bool ok() const { return problems_.empty(); }
  /// Throws ModelMismatchError("<what>: <problems> (hint: <hint>)") if any were recorded.
  void check(const std::string& what, const std::string& hint) const;

 private:
  std::map<std::string, std::vector<int64_t>> held_;  // name -> shape
  std::set<std::string> expected_;
  std::vector<std::string> problems_;
};

torch::Dtype to_torch_dtype(StDtype dtype);
StDtype to_st_dtype(torch::Dtype dtype);

/// Writes tensors (moved to the CPU, kept in their dtype) to `path` through a temporary name.
void save_safetensors(const std::string& path,
                      const TensorMap& tensors,
                      const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

/// Writes tensors as shards of at most `max_shard_bytes` of data each, named
/// model-0000i-of-0000n.safetensors, plus model.safetensors.index.json; one shard is written
/// as model.safetensors with no index.
void save_safetensors_sharded(const std::string& dir,
                              const TensorMap& tensors,
                              uint64_t max_shard_bytes);

/// The tensors of a torch.save file (adapter_model.bin, trainable_params.bin), copied out on
/// the CPU in their dtypes. Nothing in the file runs: core/torch_save_format.h reads only
/// dicts of tensors and refuses the rest with an IoError.
TensorMap load_torch_bin(const std::string& path);

/// Writes tensors (moved to the CPU, kept in their dtype) as torch.save writes a dict of
/// them, through a temporary name: what torch.load(weights_only=True) reads.
void save_torch_bin(const std::string& path, const TensorMap& tensors);

/// Writes `text` to `path` through a temporary name in the same folder, then renames it.
void write_file_atomic(const std::string& path, const std::string& text);

}  // namespace lorafit
