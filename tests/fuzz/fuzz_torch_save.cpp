// libFuzzer target: the torch.save reader must refuse any byte string with an IoError, never
// crash, read out of bounds or accept a tensor outside its storage. The input is read twice:
// as a whole file, and as the pickle of an archive with valid CRCs (so that mutations reach the
// unpickler instead of stopping at the zip's checks), beside storages "0" and "1".
#include <cstddef>
#include <cstdint>

#include "core/errors.h"
#include "core/torch_save_format.h"

namespace {

void check(const uint8_t* data, size_t size) {
  try {
    const auto archive = lorafit::parse_torch_save(data, size, "fuzz.bin");
    for (const auto& [key, s] : archive.storages) {
      if (s.offset > size || s.bytes > size - s.offset) __builtin_trap();
    }
    for (const auto& [name, t] : archive.tensors) {
      const auto& s = archive.storages.at(t.storage);
      const uint64_t elem = lorafit::st_dtype_size(s.dtype);
      uint64_t last = static_cast<uint64_t>(t.offset), empty = 0;
      for (size_t d = 0; d < t.shape.size(); ++d) {
        if (t.shape[d] == 0)
          empty = 1;
        else
          last += static_cast<uint64_t>(t.shape[d] - 1) * static_cast<uint64_t>(t.stride[d]);
      }
      if (!empty && (last + 1) * elem > s.bytes) __builtin_trap();
    }
  } catch (const lorafit::IoError&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  check(data, size);
  const auto file =
      lorafit::torch_save_archive(std::string(reinterpret_cast<const char*>(data), size),
                                  {{"0", std::string(16, '\1')}, {"1", std::string(6, '\2')}});
  check(reinterpret_cast<const uint8_t*>(file.data()), file.size());
  return 0;
}
