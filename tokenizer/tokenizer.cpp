#include "tokenizer/tokenizer.h"

#include <dlfcn.h>
#include <unistd.h>

#include <filesystem>

#include "core/errors.h"

namespace lorafit {

namespace {

namespace fs = std::filesystem;

constexpr size_t kErrSize = 512;

// The sentencepiece shim (see sentencepiece_shim.cpp), loaded once from beside the executable.
struct Shim {
  void* (*load)(const char*, char*, size_t);
  void (*free)(void*);
  int64_t (*piece_size)(void*);
  int64_t (*encode)(void*, const char*, size_t, int64_t*, size_t, char*, size_t);
  int64_t (*decode)(void*, const int64_t*, size_t, char*, size_t, char*, size_t);
};

const Shim& shim() {
  static const Shim s = [] {
    const fs::path exe = fs::read_symlink("/proc/self/exe");
    std::string tried;
    void* lib = nullptr;
    for (const auto& dir : {exe.parent_path(), exe.parent_path().parent_path() / "lib"}) {
      const auto path = dir / "liblorafit_sentencepiece.so";
      tried += (tried.empty() ? "" : ", ") + path.string();
      lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
      if (lib) break;
    }
    if (!lib) {
      throw std::runtime_error("cannot load the sentencepiece shim (tried " + tried +
                               "): " + dlerror());
    }
    auto sym = [&](const char* name) {
      void* p = dlsym(lib, name);
      if (!p) throw std::runtime_error(std::string("sentencepiece shim lacks ") + name);
      return p;
    };
    return Shim{reinterpret_cast<decltype(Shim::load)>(sym("lorafit_spm_load")),
                reinterpret_cast<decltype(Shim::free)>(sym("lorafit_spm_free")),
                reinterpret_cast<decltype(Shim::piece_size)>(sym("lorafit_spm_piece_size")),
                reinterpret_cast<decltype(Shim::encode)>(sym("lorafit_spm_encode")),
                reinterpret_cast<decltype(Shim::decode)>(sym("lorafit_spm_decode"))};
  }();
  return s;
}

}  // namespace

struct Tokenizer::Impl {
  void* sp = nullptr;
  ~Impl() {
    if (sp) shim().free(sp);
  }
};

Tokenizer::Tokenizer(const std::string& model_path) : impl_(std::make_unique<Impl>()) {
  if (!fs::is_regular_file(model_path)) {
    throw IoError(
        "tokenizer '" + model_path +
        "' not found (hint: lorafit reads LLaMA 1/2 sentencepiece tokenizer.model files)");
  }
  char err[kErrSize] = {0};
  impl_->sp = shim().load(model_path.c_str(), err, sizeof(err));
  if (!impl_->sp) {
    throw IoError("tokenizer '" + model_path + "' is not a sentencepiece model: " + err);
  }
}

Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;

std::vector<int64_t> Tokenizer::encode(const std::string& text) const {
  // Pieces are at least one byte each, so text.size() + 1 ids always suffice.
  std::vector<int64_t> ids(text.size() + 1);
  char err[kErrSize] = {0};
  const auto n =
      shim().encode(impl_->sp, text.data(), text.size(), ids.data(), ids.size(), err, sizeof(err));
  if (n < 0) throw IoError(std::string("cannot tokenize text: ") + err);
  if (static_cast<size_t>(n) > ids.size()) {
    ids.resize(n);
    shim().encode(impl_->sp, text.data(), text.size(), ids.data(), ids.size(), err, sizeof(err));
  }
  ids.resize(n);
  return ids;
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids) const {
  std::string text(ids.size() * 8 + 16, '\0');
  char err[kErrSize] = {0};
  auto n =
      shim().decode(impl_->sp, ids.data(), ids.size(), text.data(), text.size(), err, sizeof(err));
  if (n < 0) throw IoError(std::string("cannot decode token ids: ") + err);
  if (static_cast<size_t>(n) > text.size()) {
    text.resize(n);
    shim().decode(impl_->sp, ids.data(), ids.size(), text.data(), text.size(), err, sizeof(err));
  }
  text.resize(n);
  return text;
}

int64_t Tokenizer::vocab_size() const {
  return shim().piece_size(impl_->sp);
}

Tokenizer load_tokenizer(const std::string& model_dir) {
  return Tokenizer((fs::path(model_dir) / "tokenizer.model").string());
}

}  // namespace lorafit
