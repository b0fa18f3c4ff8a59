// The tokenizer of a model folder, behind one small interface: a Hugging Face tokenizer.json
// with a byte-level BPE (Llama 3.x, Qwen; see bpe.h) when the folder has one lorafit computes,
// else sentencepiece (LLaMA 1/2 `tokenizer.model`).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace lorafit {

class ByteLevelBpe;

class Tokenizer {
 public:
  /// Loads a sentencepiece model file (tokenizer.model) or a tokenizer.json, by its name;
  /// IoError naming the file if it cannot.
  explicit Tokenizer(const std::string& path);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;

  /// Token ids of `text`; with `add_special_tokens`, the tokens that transformers'
  /// tokenizer(text) adds (sentencepiece: BOS; tokenizer.json: its post-processor's).
  std::vector<int64_t> encode(const std::string& text, bool add_special_tokens = false) const;
  std::string decode(const std::vector<int64_t>& ids) const;
  int64_t vocab_size() const;
  /// The vocabulary's spelling of a token ("Ġworld", "▁world").
  std::string token(int64_t id) const;
  /// Which file the tokenizer came from.
  const std::string& path() const { return path_; }
  /// The id of tokenizer_config.json's eos_token beside a tokenizer.json (what ends a
  /// training record in transformers); none for sentencepiece or without that file.
  std::optional<int64_t> eos_id() const { return eos_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string path_;
  std::optional<int64_t> eos_;
};

/// The tokenizer of a Hugging Face model folder: DIR/tokenizer.json if lorafit computes its
/// kind, else DIR/tokenizer.model; an IoError naming both when neither is there.
Tokenizer load_tokenizer(const std::string& model_dir);

/// Whether a model folder has a tokenizer file (tokenizer.json or tokenizer.model).
bool has_tokenizer(const std::string& model_dir);

}  // namespace lorafit
