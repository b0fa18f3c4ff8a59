#include "core/safetensors_format.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>

#include "core/errors.h"

namespace lorafit {

namespace {

struct DtypeInfo {
  StDtype dtype;
  const char* name;
  size_t size;
};

constexpr DtypeInfo kDtypes[] = {
    {StDtype::F64, "F64", 8},   {StDtype::F32, "F32", 4}, {StDtype::F16, "F16", 2},
    {StDtype::BF16, "BF16", 2}, {StDtype::I64, "I64", 8}, {StDtype::I32, "I32", 4},
    {StDtype::I16, "I16", 2},   {StDtype::I8, "I8", 1},   {StDtype::U8, "U8", 1},
    {StDtype::BOOL, "BOOL", 1},
};

const DtypeInfo& info(StDtype dtype) {
  for (const auto& d : kDtypes) {
    if (d.dtype == dtype) return d;
  }
  throw std::logic_error("unhandled safetensors dtype");
}

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw IoError("safetensors file '" + path + "': " + what);
}

StEntry parse_entry(const std::string& path,
                    const std::string& name,
                    const nlohmann::json& j,
                    uint64_t data_size) {
  const std::string where = "tensor '" + name + "'";
  if (!j.is_object()) fail(path, where + " is not a JSON object");
  StEntry e;
  e.name = name;

  const auto dt = j.find("dtype");
  if (dt == j.end() || !dt->is_string()) fail(path, where + " has no \"dtype\" string");
  const auto& dname = dt->get_ref<const std::string&>();
  const auto* found = std::find_if(std::begin(kDtypes), std::end(kDtypes),
                                   [&](const DtypeInfo& d) { return dname == d.name; });
  if (found == std::end(kDtypes)) {
    fail(path, where + " has dtype '" + dname +
                   "', which lorafit does not read (expected F32, F16, BF16, F64, I64, I32, I16, "
                   "I8, U8 or BOOL)");
  }
  e.dtype = found->dtype;

  const auto sh = j.find("shape");
  if (sh == j.end() || !sh->is_array()) fail(path, where + " has no \"shape\" array");
  // numel is bounded by the data size, so an overflowing product is always an error.
  uint64_t numel = 1;
  bool overflow = false;
  for (const auto& d : *sh) {
    if (!d.is_number_unsigned() && !(d.is_number_integer() && d.get<int64_t>() >= 0)) {
      fail(path, where + " has a shape entry that is not a non-negative integer");
    }
    const uint64_t v = d.get<uint64_t>();
    if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) overflow = true;
    if (v != 0 && numel > std::numeric_limits<uint64_t>::max() / v) overflow = true;
    numel = overflow ? 0 : numel * v;
    e.shape.push_back(static_cast<int64_t>(v));
  }

  const auto off = j.find("data_offsets");
  if (off == j.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
      !(*off)[1].is_number_unsigned()) {
    fail(path, where + " has no \"data_offsets\" pair of non-negative integers");
  }
  e.begin = (*off)[0].get<uint64_t>();
  e.end = (*off)[1].get<uint64_t>();
  if (e.begin > e.end || e.end > data_size) {
    fail(path, where + " has data_offsets [" + std::to_string(e.begin) + ", " +
                   std::to_string(e.end) + ") outside the data buffer of " +
                   std::to_string(data_size) + " bytes (hint: the file may be truncated)");
  }
  const uint64_t itemsize = info(e.dtype).size;
  if (overflow || numel > (e.end - e.begin) / itemsize || numel * itemsize != e.end - e.begin) {
    fail(path, where + " spans " + std::to_string(e.end - e.begin) +
                   " bytes, which does not match its shape and dtype " + dname);
  }
  return e;
}

}  // namespace

size_t st_dtype_size(StDtype dtype) {
  return info(dtype).size;
}

const char* st_dtype_name(StDtype dtype) {
  return info(dtype).name;
}

StHeader parse_st_header(const uint8_t* data,
                         size_t available,
                         uint64_t file_size,
                         const std::string& path) {
  if (file_size < 8 || available < 8) {
    fail(path, "is " + std::to_string(file_size) +
                   " bytes long, shorter than the 8-byte header length (hint: truncated file)");
  }
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | data[i];
  if (n > kMaxStHeaderBytes) {
    fail(path, "declares a header of " + std::to_string(n) + " bytes, more than the limit of " +
                   std::to_string(kMaxStHeaderBytes) + " (hint: not a safetensors file?)");
  }
  if (n > file_size - 8 || n > available - 8) {
    fail(path, "declares a header of " + std::to_string(n) + " bytes but the file has only " +
                   std::to_string(file_size - 8) + " after the length (hint: truncated file)");
  }
  const char* text = reinterpret_cast<const char*>(data + 8);
  if (n == 0 || text[0] != '{') fail(path, "has a header that is not a JSON object");

  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text, text + n);
  } catch (const nlohmann::json::exception& e) {
    fail(path, std::string("has a header that is not valid JSON: ") + e.what());
  }
  if (!j.is_object()) fail(path, "has a header that is not a JSON object");

  StHeader h;
  h.data_start = 8 + n;
  const uint64_t data_size = file_size - h.data_start;
  for (const auto& [key, value] : j.items()) {
    if (key == "__metadata__") {
      if (!value.is_object()) fail(path, "has a __metadata__ that is not an object");
      for (const auto& [mk, mv] : value.items()) {
        if (!mv.is_string()) fail(path, "has __metadata__ value '" + mk + "' that is not a string");
        h.metadata[mk] = mv.get<std::string>();
      }
      continue;
    }
    h.entries.push_back(parse_entry(path, key, value, data_size));
  }

  std::sort(h.entries.begin(), h.entries.end(), [](const StEntry& a, const StEntry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  for (size_t i = 1; i < h.entries.size(); ++i) {
    const auto& prev = h.entries[i - 1];
    const auto& cur = h.entries[i];
    if (cur.begin < prev.end) {
      fail(path, "has overlapping tensors '" + prev.name + "' and '" + cur.name + "'");
    }
  }
  return h;
}

std::string make_st_header(std::vector<StEntry>& entries,
                           const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json j;
  if (!metadata.empty()) j["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (auto& e : entries) {
    uint64_t numel = 1;
    for (auto d : e.shape) numel *= static_cast<uint64_t>(d);
    e.begin = offset;
    e.end = offset + numel * st_dtype_size(e.dtype);
    offset = e.end;
    j[e.name] = {
        {"dtype", st_dtype_name(e.dtype)}, {"shape", e.shape}, {"data_offsets", {e.begin, e.end}}};
  }
  std::string text = j.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data buffer starts 8-byte aligned
  std::string out(8, '\0');
  uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + text;
}

}  // namespace lorafit
