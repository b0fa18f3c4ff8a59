// The safetensors container format, without LibTorch: header parsing and validation against
// the file's size, and header writing. Kept free of LibTorch so the fuzzer can drive it.
//
// Layout: u64 little-endian N, then N bytes of JSON, then the data buffer. Each JSON entry is
// {"dtype", "shape", "data_offsets": [begin, end)} relative to the data buffer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace lorafit {

enum class StDtype { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL };

/// Bytes per element of a dtype.
size_t st_dtype_size(StDtype dtype);
/// The dtype's name as safetensors spells it ("BF16").
const char* st_dtype_name(StDtype dtype);

struct StEntry {
  std::string name;
  StDtype dtype = StDtype::F32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // offset into the data buffer
  uint64_t end = 0;    // exclusive
};

struct StHeader {
  std::vector<StEntry> entries;  // sorted by begin offset
  std::map<std::string, std::string> metadata;
  uint64_t data_start = 0;  // byte offset of the data buffer in the file
};

/// The reference implementation's bound; a larger header is an attack or a corrupt file.
constexpr uint64_t kMaxStHeaderBytes = 100'000'000;

/// Parses and validates the header of a safetensors file of `file_size` bytes whose first
/// `available` bytes are at `data` (at least the 8-byte length plus the JSON must be there).
/// Every entry is checked: known dtype, non-negative shape, offsets inside the file, size equal
/// to numel * itemsize, no overlaps. Throws IoError naming `path` on any problem.
StHeader parse_st_header(const uint8_t* data,
                         size_t available,
                         uint64_t file_size,
                         const std::string& path);

/// Builds the 8-byte length and the JSON header (padded with spaces to a multiple of 8) for
/// entries laid out back to back in the given order; fills in their offsets.
std::string make_st_header(std::vector<StEntry>& entries,
                           const std::map<std::string, std::string>& metadata);

}  // namespace lorafit
