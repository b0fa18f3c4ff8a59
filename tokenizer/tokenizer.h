// A sentencepiece tokenizer (LLaMA 1/2 `tokenizer.model`). BOS and EOS are the model's
// (config.json), so the tokenizer itself adds neither.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace lorafit {

class Tokenizer {
 public:
  /// Loads a sentencepiece model file; IoError naming the file if it cannot.
  explicit Tokenizer(const std::string& model_path);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;

  /// Token ids of `text`, without BOS or EOS.
  std::vector<int64_t> encode(const std::string& text) const;
  std::string decode(const std::vector<int64_t>& ids) const;
  int64_t vocab_size() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// The tokenizer of a Hugging Face model folder (DIR/tokenizer.model).
Tokenizer load_tokenizer(const std::string& model_dir);

}  // namespace lorafit
