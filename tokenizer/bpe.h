// Hugging Face tokenizer.json files with a byte-level BPE model (Llama 3.x, Qwen2/Qwen3,
// GPT-2 style), computed as the Rust `tokenizers` library does: added tokens matched first in
// the raw text (leftmost, then longest), the normalizer (NFC through utf8proc), the
// pre-tokenizers (Split on the file's regex through PCRE2 with Unicode properties, ByteLevel),
// BPE by merge rank with a cache, the post-processor (TemplateProcessing adds Llama 3.1's
// <|begin_of_text|>) and the ByteLevel decoder.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace lorafit {

class ByteLevelBpe {
 public:
  /// Reads a tokenizer.json. A file that is not JSON, or whose model, merges or added tokens
  /// are malformed, is an IoError naming the file and the part; a component lorafit does not
  /// compute (another model type, normalizer, pre-tokenizer, post-processor or decoder) is an
  /// IoError that names it, and `supported` tells the two apart.
  static std::unique_ptr<ByteLevelBpe> load(const std::string& path);
  /// The same from the file's text; `name` stands for the file in messages.
  static std::unique_ptr<ByteLevelBpe> parse(const std::string& text, const std::string& name);
  /// Whether the file's pipeline is one lorafit computes (the model type and components),
  /// without checking the rest: a folder whose tokenizer.json is of another kind falls back to
  /// its tokenizer.model.
  static bool supported(const std::string& path);

  ~ByteLevelBpe();

  /// The ids of `text` as `tokenizers`' encode gives them; `add_special_tokens` runs the
  /// post-processor (transformers' tokenizer(text) does; apply_chat_template does not).
  std::vector<int64_t> encode(const std::string& text, bool add_special_tokens) const;
  /// The text of `ids`, special tokens included, as `tokenizers`' decode gives it.
  std::string decode(const std::vector<int64_t>& ids) const;
  /// One more than the largest id (added tokens included).
  int64_t vocab_size() const;
  /// The token of an id as the vocabulary spells it ("Ġworld"); empty for an unknown id.
  std::string token(int64_t id) const;
  /// The id of a token (a vocabulary entry or an added token).
  std::optional<int64_t> token_id(const std::string& token) const;

 private:
  ByteLevelBpe();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace lorafit
