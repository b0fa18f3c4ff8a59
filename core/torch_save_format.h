// PyTorch's torch.save files of tensors (the zip archive of PyTorch 1.6 and later, holding a
// protocol-2 pickle and one entry per storage), free of LibTorch: parsed without running
// anything, and written so that torch.load reads them. PEFT (before safetensors), m-LoRA,
// MoE-PEFT and LongLoRA save adapters this way as adapter_model.bin / trainable_params.bin.
//
// A pickle is a program; this reader is not an interpreter of it. It knows the few opcodes that
// torch.save emits for containers of tensors, and of all globals only the tensor rebuild
// functions, the typed storages and OrderedDict. Anything else is refused before it is used.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/safetensors_format.h"

namespace lorafit {

/// One tensor of a torch.save file: where its elements lie in its storage.
struct PtTensor {
  StDtype dtype = StDtype::F32;
  std::vector<int64_t> shape;
  std::vector<int64_t> stride;  // in elements
  int64_t offset = 0;           // in elements, from the storage's start
  std::string storage;          // the storage's key (the archive's data/<key>)
};

/// A storage's bytes: a range of the file.
struct PtStorage {
  StDtype dtype = StDtype::F32;
  uint64_t offset = 0;  // bytes from the file's start
  uint64_t bytes = 0;
};

/// A parsed torch.save file. Names of tensors in nested dicts are joined with ".".
struct PtArchive {
  std::map<std::string, PtTensor> tensors;
  std::map<std::string, PtStorage> storages;
};

/// Parses the `size` bytes of a torch.save file. Every tensor lies inside its storage, every
/// storage inside the file, and every entry read has its CRC-32. Throws IoError naming `path`
/// for a damaged file, a legacy (pre-1.6) or big-endian one, and for a pickle that holds
/// anything but tensors in (nested) dicts with string keys.
PtArchive parse_torch_save(const uint8_t* data, size_t size, const std::string& path);

/// One tensor to write: contiguous elements.
struct PtTensorBytes {
  StDtype dtype = StDtype::F32;
  std::vector<int64_t> shape;
  std::string bytes;  // little-endian elements, row-major
};

/// The bytes of a torch.save file of a plain dict of these tensors (in name order), laid out
/// as torch.save lays it out (entries stored, data aligned to 64 bytes).
std::string torch_save_bytes(const std::map<std::string, PtTensorBytes>& tensors);

/// The zip that torch.save writes around a pickle: archive/data.pkl = `pickle`, each
/// archive/data/<key> = its bytes, plus the version and byteorder entries. Exposed so that
/// tests can wrap pickles of their own.
std::string torch_save_archive(const std::string& pickle,
                               const std::vector<std::pair<std::string, std::string>>& storages);

}  // namespace lorafit
