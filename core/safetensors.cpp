#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "core/errors.h"
#include "core/run_dir.h"

namespace lorafit {

namespace fs = std::filesystem;

namespace {
// Block size for read_ahead(): large enough for the disk's sequential speed.
constexpr size_t kReadAheadBlock = 32 << 20;
}  // namespace

struct SafetensorsFile::Mapping {
  void* addr = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (addr && size) munmap(addr, size);
  }
};

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw IoError("cannot open '" + path + "': " + std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw IoError("'" + path + "' is not a regular file");
  }
  map_ = std::make_shared<Mapping>();
  map_->size = static_cast<size_t>(st.st_size);
  if (map_->size > 0) {
    // Private and writable: tensors viewing the file may be modified in place without
    // touching the file (copy-on-write).
    void* addr = mmap(nullptr, map_->size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (addr == MAP_FAILED) {
      ::close(fd);
      throw IoError("cannot map '" + path + "': " + std::strerror(errno));
    }
    map_->addr = addr;
    madvise(addr, map_->size, MADV_SEQUENTIAL);
  }
  ::close(fd);
  header_ = parse_st_header(static_cast<const uint8_t*>(map_->addr), map_->size, map_->size, path);
  for (size_t i = 0; i < header_.entries.size(); ++i) index_[header_.entries[i].name] = i;
}

const StEntry* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &header_.entries[it->second];
}

torch::Tensor SafetensorsFile::tensor(const std::string& name) const {
  const StEntry* e = find(name);
  if (!e) throw ModelMismatchError("tensor '" + name + "' is not in '" + path_ + "'");
  auto* ptr = static_cast<uint8_t*>(map_->addr) + header_.data_start + e->begin;
  auto keep = map_;
  if (e->begin == e->end) return torch::empty(e->shape, torch::dtype(to_torch_dtype(e->dtype)));
  // The view keeps the mapping alive through its deleter.
  return torch::from_blob(
      ptr, e->shape, [keep](void*) mutable { keep.reset(); },
      torch::dtype(to_torch_dtype(e->dtype)));
}

SafetensorsCheckpoint::SafetensorsCheckpoint(const std::string& dir) {
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  const fs::path single = fs::path(dir) / "model.safetensors";
  std::vector<std::string> shard_names;
  std::map<std::string, std::string> weight_map;
  if (fs::exists(index_path)) {
    std::ifstream in(index_path);
    nlohmann::json j;
    try {
      in >> j;
    } catch (const nlohmann::json::exception& e) {
      throw IoError("index '" + index_path.string() + "' is not valid JSON: " + e.what());
    }
    const auto wm = j.is_object() ? j.find("weight_map") : j.end();
    if (wm == j.end() || !wm->is_object()) {
      throw IoError("index '" + index_path.string() + "' has no \"weight_map\" object");
    }
    std::set<std::string> seen;
    for (const auto& [name, file] : wm->items()) {
      if (!file.is_string() || file.get<std::string>().find('/') != std::string::npos) {
        throw IoError("index '" + index_path.string() + "' maps '" + name +
                      "' to something that is not a file name in the folder");
      }
      weight_map[name] = file.get<std::string>();
      if (seen.insert(file.get<std::string>()).second) shard_names.push_back(file);
    }
    for (const auto& s : shard_names) {
      if (!fs::exists(fs::path(dir) / s)) {
        throw IoError("shard '" + (fs::path(dir) / s).string() + "' listed in '" +
                      index_path.string() + "' is missing");
      }
    }
  } else if (fs::exists(single)) {
    shard_names.push_back("model.safetensors");
  } else {
    throw IoError("no model.safetensors or model.safetensors.index.json in '" + dir +
                  "' (hint: lorafit reads Hugging Face checkpoints in safetensors format)");
  }

  for (const auto& s : shard_names) {
    files_.push_back(std::make_unique<SafetensorsFile>((fs::path(dir) / s).string()));
    const SafetensorsFile* f = files_.back().get();
    for (const auto& e : f->header().entries) {
      if (!owner_.emplace(e.name, f).second) {
        throw IoError("tensor '" + e.name + "' appears in more than one shard of '" + dir + "'");
      }
    }
  }
  for (const auto& [name, file] : weight_map) {
    auto it = owner_.find(name);
    if (it == owner_.end() || fs::path(it->second->path()).filename() != file) {
      throw IoError("index '" + index_path.string() + "' says tensor '" + name + "' is in '" +
                    file + "', but it is not there");
    }
  }
}

std::map<std::string, const StEntry*> SafetensorsCheckpoint::entries() const {
  std::map<std::string, const StEntry*> out;
  for (const auto& [name, f] : owner_) out[name] = f->find(name);
  return out;
}

torch::Tensor SafetensorsCheckpoint::tensor(const std::string& name) const {
  auto it = owner_.find(name);
  if (it == owner_.end())
    throw ModelMismatchError("tensor '" + name + "' is not in the checkpoint");
  return it->second->tensor(name);
}

uint64_t SafetensorsCheckpoint::data_bytes() const {
  uint64_t total = 0;
  for (const auto& [name, f] : owner_) {
    const StEntry* e = f->find(name);
    total += e->end - e->begin;
  }
  return total;
}

std::pair<size_t, uint64_t> SafetensorsCheckpoint::position(const std::string& name) const {
  const SafetensorsFile* f = owner_.at(name);
  for (size_t i = 0; i < files_.size(); ++i) {
    if (files_[i].get() == f) return {i, f->find(name)->begin};
  }
  throw std::logic_error("tensor owner not among the shards");
}

void SafetensorsCheckpoint::read_ahead() const {
  std::vector<char> block(kReadAheadBlock);
  for (const auto& f : files_) {
    const int fd = ::open(f->path().c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;  // only a speed-up: the mapping still reads what it needs
    posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    while (::read(fd, block.data(), block.size()) > 0) {
    }
    ::close(fd);
  }
}

TensorBinding::TensorBinding(const TensorMap& held) {
  for (const auto& [name, t] : held) held_[name] = t.sizes().vec();
}

TensorBinding::TensorBinding(const SafetensorsCheckpoint& held) {
  for (const auto& [name, e] : held.entries()) held_[name] = e->shape;
}

bool TensorBinding::expect(const std::string& name, torch::IntArrayRef shape) {
  expected_.insert(name);
  const auto it = held_.find(name);
  if (it == held_.end()) {
    problems_.push_back("missing tensor '" + name + "' " + shape_text(shape));
    return false;
  }
  if (torch::IntArrayRef(it->second) != shape) {
    problems_.push_back("tensor '" + name + "' has shape " + shape_text(it->second) +
                        ", expected " + shape_text(shape));
    return false;
  }
  return true;
}

bool TensorBinding::expect(const std::string& name) {
  expected_.insert(name);
  if (held_.count(name)) return true;
  problems_.push_back("missing tensor '" + name + "'");
  return false;
}

void TensorBinding::problem(std::string text) {
  problems_.push_back(std::move(text));
}

void TensorBinding::report_unexpected(const std::string& why,
                                      const std::function<bool(const std::string&)>& allowed) {
  for (const auto& [name, shape] : held_) {
    if (expected_.count(name) || (allowed && allowed(name))) continue;
    problems_.push_back(why.empty() ? "unexpected tensor '" + name + "' " + shape_text(shape)
                                    : "tensor '" + name + "' " + why + " (shape " +
                                          shape_text(shape) + ")");
  }
}

void TensorBinding::check(const std::string& what, const std::string& hint) const {
  if (problems_.empty()) return;
  throw ModelMismatchError(what + ": " + join_problems(problems_) + " (hint: " + hint + ")");
}

torch::Dtype to_torch_dtype(StDtype dtype) {
  switch (dtype) {
    case StDtype::F64:
      return torch::kFloat64;
    case StDtype::F32:
      return torch::kFloat32;
    case StDtype::F16:
      return torch::kFloat16;
    case StDtype::BF16:
      return torch::kBFloat16;
    case StDtype::I64:
      return torch::kInt64;
    case StDtype::I32:
      return torch::kInt32;
    case StDtype::I16:
      return torch::kInt16;
    case StDtype::I8:
      return torch::kInt8;
    case StDtype::U8:
      return torch::kUInt8;
    case StDtype::BOOL:
      return torch::kBool;
  }
  throw std::logic_error("unhandled safetensors dtype");
}

StDtype to_st_dtype(torch::Dtype dtype) {
  for (StDtype d : {StDtype::F64, StDtype::F32, StDtype::F16, StDtype::BF16, StDtype::I64,
                    StDtype::I32, StDtype::I16, StDtype::I8, StDtype::U8, StDtype::BOOL}) {
    if (to_torch_dtype(d) == dtype) return d;
  }
  throw std::invalid_argument(std::string("safetensors cannot hold dtype ") + c10::toString(dtype));
}

TensorMap load_torch_bin(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw IoError("cannot open '" + path + "': " + std::strerror(errno));
  const auto size = static_cast<int64_t>(in.tellg());
  auto file = torch::empty({size}, torch::kUInt8);  // [size] the whole file, aligned
  in.seekg(0);
  if (!in.read(static_cast<char*>(file.data_ptr()), size)) {
    throw IoError("cannot read '" + path + "': " + std::strerror(errno));
  }
  const auto archive = parse_torch_save(file.data_ptr<uint8_t>(), static_cast<size_t>(size), path);
  std::map<std::string, torch::Tensor> storages;  // key -> [numel] in its dtype
  for (const auto& [key, s] : archive.storages) {
    auto raw = file.narrow(0, static_cast<int64_t>(s.offset), static_cast<int64_t>(s.bytes));
    // A view needs the dtype's alignment (torch.save aligns to 64); otherwise a copy.
    if (s.offset % st_dtype_size(s.dtype)) raw = raw.clone();
    storages[key] = raw.view(to_torch_dtype(s.dtype));
  }
  TensorMap out;
  for (const auto& [name, t] : archive.tensors) {
    const auto& storage = storages.at(t.storage);
    // as_strided's offset counts from the start of the file's buffer, not of the view.
    out[name] = storage.as_strided(t.shape, t.stride, storage.storage_offset() + t.offset).clone();
  }
  return out;
}

void save_torch_bin(const std::string& path, const TensorMap& tensors) {
  std::map<std::string, PtTensorBytes> out;
  for (const auto& [name, t] : tensors) {
    const auto c = t.detach().to(torch::kCPU).contiguous();
    auto& o = out[name];
    o.dtype = to_st_dtype(c.scalar_type());
    o.shape = c.sizes().vec();
    o.bytes.assign(static_cast<const char*>(c.data_ptr()), c.nbytes());
  }
  write_file_atomic(path, torch_save_bytes(out));
}

void write_file_atomic(const std::string& path, const std::string& text) {
  const std::string tmp = temp_path(path).string();
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    out.flush();
    if (!out) {
      std::remove(tmp.c_str());
      throw IoError("cannot write '" + tmp + "' (hint: is the disk full or the folder read-only?)");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw IoError("cannot rename '" + tmp + "' to '" + path + "': " + std::strerror(errno));
  }
}

void save_safetensors(const std::string& path,
                      const TensorMap& tensors,
                      const std::map<std::string, std::string>& metadata) {
  std::vector<StEntry> entries;
  std::vector<torch::Tensor> cpu;
  for (const auto& [name, t] : tensors) {
    StEntry e;
    e.name = name;
    e.dtype = to_st_dtype(t.scalar_type());
    e.shape = t.sizes().vec();
    entries.push_back(e);
    cpu.push_back(t.detach().to(torch::kCPU).contiguous());
  }
  std::string bytes = make_st_header(entries, metadata);
  for (size_t i = 0; i < cpu.size(); ++i) {
    bytes.append(static_cast<const char*>(cpu[i].data_ptr()), entries[i].end - entries[i].begin);
  }
  write_file_atomic(path, bytes);
}

void save_safetensors_sharded(const std::string& dir,
                              const TensorMap& tensors,
                              uint64_t max_shard_bytes) {
  std::vector<TensorMap> shards(1);
  uint64_t current = 0, total = 0;
  for (const auto& [name, t] : tensors) {
    const uint64_t bytes = static_cast<uint64_t>(t.numel()) * t.element_size();
    if (current > 0 && current + bytes > max_shard_bytes) {
      shards.emplace_back();
      current = 0;
    }
    shards.back()[name] = t;
    current += bytes;
    total += bytes;
  }
  if (shards.size() == 1) {
    save_safetensors((fs::path(dir) / "model.safetensors").string(), shards[0]);
    return;
  }
  nlohmann::ordered_json index;
  index["metadata"] = {{"total_size", total}};
  nlohmann::json weight_map =
      nlohmann::json::object();  // sorted by name, as transformers writes it
  char name[64];
  for (size_t i = 0; i < shards.size(); ++i) {
    std::snprintf(name, sizeof(name), "model-%05zu-of-%05zu.safetensors", i + 1, shards.size());
    save_safetensors((fs::path(dir) / name).string(), shards[i]);
    for (const auto& [tensor_name, t] : shards[i]) weight_map[tensor_name] = name;
  }
  index["weight_map"] = weight_map;
  write_file_atomic((fs::path(dir) / "model.safetensors.index.json").string(), index.dump(2));
}

}  // namespace lorafit
