#include "tokenizer/tokenizer.h"

#include <dlfcn.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/errors.h"
#include "tokenizer/bpe.h"

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
  int64_t (*bos_id)(void*);
  void (*id_to_piece)(void*, int64_t, char*, size_t);
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
                reinterpret_cast<decltype(Shim::decode)>(sym("lorafit_spm_decode")),
                reinterpret_cast<decltype(Shim::bos_id)>(sym("lorafit_spm_bos_id")),
                reinterpret_cast<decltype(Shim::id_to_piece)>(sym("lorafit_spm_id_to_piece"))};
  }();
  return s;
}

// tokenizer_config.json's eos_token (a string, or an object with its "content") as an id of
// `bpe`; none without the file or the key.
std::optional<int64_t> config_eos(const ByteLevelBpe& bpe, const fs::path& config_path) {
  if (!fs::is_regular_file(config_path)) return std::nullopt;
  std::ifstream in(config_path);
  const auto config = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (!config.is_object()) {
    throw IoError("tokenizer config '" + config_path.string() +
                  "' is not a JSON object (hint: is the file complete?)");
  }
  const auto eos = config.find("eos_token");
  if (eos == config.end() || eos->is_null()) return std::nullopt;
  const auto* content = eos->is_object() && eos->contains("content") ? &(*eos)["content"] : &*eos;
  if (!content->is_string()) {
    throw IoError("tokenizer config '" + config_path.string() + "': eos_token " + eos->dump() +
                  " is neither a string nor {\"content\": string}");
  }
  const auto id = bpe.token_id(content->get<std::string>());
  if (!id) {
    throw IoError("tokenizer config '" + config_path.string() + "': eos_token '" +
                  content->get<std::string>() + "' is not a token of its tokenizer.json");
  }
  return id;
}

}  // namespace

struct Tokenizer::Impl {
  void* sp = nullptr;                 // sentencepiece, or
  std::unique_ptr<ByteLevelBpe> bpe;  // tokenizer.json
  ~Impl() {
    if (sp) shim().free(sp);
  }
};

Tokenizer::Tokenizer(const std::string& path) : impl_(std::make_unique<Impl>()), path_(path) {
  if (!fs::is_regular_file(path)) {
    throw IoError("tokenizer '" + path +
                  "' not found (hint: lorafit reads tokenizer.json (byte-level BPE) and "
                  "sentencepiece tokenizer.model files)");
  }
  if (fs::path(path).extension() == ".json") {
    impl_->bpe = ByteLevelBpe::load(path);
    eos_ = config_eos(*impl_->bpe, fs::path(path).parent_path() / "tokenizer_config.json");
    return;
  }
  char err[kErrSize] = {0};
  impl_->sp = shim().load(path.c_str(), err, sizeof(err));
  if (!impl_->sp) {
    throw IoError("tokenizer '" + path + "' is not a sentencepiece model: " + err);
  }
}

Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;

std::vector<int64_t> Tokenizer::encode(const std::string& text, bool add_special_tokens) const {
  if (impl_->bpe) return impl_->bpe->encode(text, add_special_tokens);
  // Pieces are at least one byte each, so text.size() + 2 ids always suffice.
  std::vector<int64_t> ids(text.size() + 2);
  char err[kErrSize] = {0};
  const size_t first = add_special_tokens ? 1 : 0;
  const auto n = shim().encode(impl_->sp, text.data(), text.size(), ids.data() + first,
                               ids.size() - first, err, sizeof(err));
  if (n < 0) throw IoError(std::string("cannot tokenize text: ") + err);
  if (first + static_cast<size_t>(n) > ids.size()) {
    ids.resize(first + static_cast<size_t>(n));
    shim().encode(impl_->sp, text.data(), text.size(), ids.data() + first, ids.size() - first, err,
                  sizeof(err));
  }
  ids.resize(first + static_cast<size_t>(n));
  if (add_special_tokens) ids[0] = shim().bos_id(impl_->sp);
  return ids;
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids) const {
  if (impl_->bpe) return impl_->bpe->decode(ids);
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
  return impl_->bpe ? impl_->bpe->vocab_size() : shim().piece_size(impl_->sp);
}

std::string Tokenizer::token(int64_t id) const {
  if (impl_->bpe) return impl_->bpe->token(id);
  char buf[kErrSize] = {0};
  shim().id_to_piece(impl_->sp, id, buf, sizeof(buf));
  return buf;
}

Tokenizer load_tokenizer(const std::string& model_dir) {
  const auto json = fs::path(model_dir) / "tokenizer.json";
  const auto model = fs::path(model_dir) / "tokenizer.model";
  // A tokenizer.json of another kind (sentencepiece-style BPE, WordPiece) leaves the folder's
  // tokenizer.model to compute the same ids.
  if (fs::is_regular_file(json) && (!fs::is_regular_file(model) || ByteLevelBpe::supported(json)))
    return Tokenizer(json.string());
  if (!fs::is_regular_file(model)) {
    throw IoError("tokenizer '" + model.string() + "' not found, nor '" + json.string() +
                  "' (hint: copy the model's tokenizer files beside its config.json)");
  }
  return Tokenizer(model.string());
}

bool has_tokenizer(const std::string& model_dir) {
  return fs::is_regular_file(fs::path(model_dir) / "tokenizer.json") ||
         fs::is_regular_file(fs::path(model_dir) / "tokenizer.model");
}

}  // namespace lorafit
