// A C interface to sentencepiece, built as its own shared library and loaded by tokenizer.cpp
// with RTLD_DEEPBIND. Debian's libsentencepiece carries its own protobuf-lite 3.14 while
// Debian's LibTorch loads libprotobuf 3.21: in one symbol scope one of them breaks (a crash at
// start-up, or a protobuf version check failing on Load). Loaded this way, sentencepiece
// binds to its own protobuf and LibTorch keeps the system one.
#include <sentencepiece_processor.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

void copy_message(const std::string& msg, char* buf, size_t size) {
  if (size == 0) return;
  std::strncpy(buf, msg.c_str(), size - 1);
  buf[size - 1] = '\0';
}

}  // namespace

extern "C" {

void* lorafit_spm_load(const char* path, char* err, size_t err_size) {
  auto* sp = new sentencepiece::SentencePieceProcessor();
  const auto status = sp->Load(path);
  if (!status.ok()) {
    copy_message(status.ToString(), err, err_size);
    delete sp;
    return nullptr;
  }
  return sp;
}

void lorafit_spm_free(void* sp) {
  delete static_cast<sentencepiece::SentencePieceProcessor*>(sp);
}

int64_t lorafit_spm_piece_size(void* sp) {
  return static_cast<sentencepiece::SentencePieceProcessor*>(sp)->GetPieceSize();
}

// Writes up to `cap` ids; returns the number of ids (which may exceed cap: call again), or -1
// with a message in err.
int64_t lorafit_spm_encode(
    void* sp, const char* text, size_t len, int64_t* ids, size_t cap, char* err, size_t err_size) {
  std::vector<int> out;
  const auto status =
      static_cast<sentencepiece::SentencePieceProcessor*>(sp)->Encode(std::string(text, len), &out);
  if (!status.ok()) {
    copy_message(status.ToString(), err, err_size);
    return -1;
  }
  for (size_t i = 0; i < out.size() && i < cap; ++i) ids[i] = out[i];
  return static_cast<int64_t>(out.size());
}

// Writes up to `cap` bytes of the decoded text; returns its length (which may exceed cap), or
// -1 with a message in err.
int64_t lorafit_spm_decode(
    void* sp, const int64_t* ids, size_t n, char* text, size_t cap, char* err, size_t err_size) {
  std::string out;
  const auto status = static_cast<sentencepiece::SentencePieceProcessor*>(sp)->Decode(
      std::vector<int>(ids, ids + n), &out);
  if (!status.ok()) {
    copy_message(status.ToString(), err, err_size);
    return -1;
  }
  std::memcpy(text, out.data(), std::min(out.size(), cap));
  return static_cast<int64_t>(out.size());
}

int64_t lorafit_spm_bos_id(void* sp) {
  return static_cast<sentencepiece::SentencePieceProcessor*>(sp)->bos_id();
}

// The piece of `id`, cut to `cap` - 1 bytes ("" for an id out of range).
void lorafit_spm_id_to_piece(void* sp, int64_t id, char* piece, size_t cap) {
  const auto* p = static_cast<sentencepiece::SentencePieceProcessor*>(sp);
  const bool known = id >= 0 && id < p->GetPieceSize();
  copy_message(known ? p->IdToPiece(static_cast<int>(id)) : "", piece, cap);
}

}  // extern "C"
