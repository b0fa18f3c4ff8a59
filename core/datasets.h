// Training examples from the four dataset formats, packed into rows, and their seeded order
// across epochs.
//   text    {"text"} (or .txt lines): BOS + tokens + EOS per document, a document longer than
//           max_seq_len in chunks of it (each its own record); with packing: concat, the
//           documents are concatenated and cut into max_seq_len blocks. Every token trains.
//   alpaca  {"instruction", "input"?, "output"}: Stanford Alpaca's prompt, then the response;
//           only the response and its EOS train.
//   chat    {"messages": [{"role", "content", ...}], "chat_template_kwargs"?: {...}}: the
//           model's own chat template (tokenizer/chat.h), or LLaMA-2's [INST] format; only
//           the assistant turns (and what ends them) train.
//   tokens  {"input_ids", "labels"?}: pre-tokenized; labels default to input_ids, -100 masks.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/hf_config.h"
#include "core/text_data.h"
#include "tokenizer/chat.h"
#include "tokenizer/tokenizer.h"

namespace lorafit {

/// Label of a position that never counts in the loss (PyTorch's ignore_index).
constexpr int64_t kIgnoreLabel = -100;

struct Example {
  std::vector<int64_t> input_ids;
  std::vector<int64_t> labels;  // aligned with input_ids; the loss shifts them by one
  // The lengths of the records packed into this row, in order (summing to its length); empty
  // when the row is one record. Each record attends to itself only, with positions from 0.
  std::vector<int64_t> segments;
};

/// How records fill rows (data.packing). Records ("true", the default): whole records share
/// rows of max_seq_len and never see each other; Concat ("concat", text only): documents run
/// into each other, cut into blocks of max_seq_len, as transformers' group_texts; Pad
/// ("false"): a record per row.
enum class Packing { Pad, Records, Concat };

/// "true" | "false" | "concat" (the recipe's values, already validated) -> Packing
Packing parse_packing(const std::string& value);

/// Whole records into rows of at most `max_len` tokens, best fit decreasing (each record,
/// longest first, into the fullest row it fits, ties to the earliest): a pure function of the
/// records, so a run resumes on the same rows. A record's first label is ignored (its first
/// token has nothing before it in the record to be predicted from), so no record learns
/// from the one before it in the row. Records must be at most max_len long.
std::vector<Example> pack_records(std::vector<Example> records, int64_t max_len);

struct DatasetOptions {
  std::string format = "text";
  int64_t max_seq_len = 512;
  Packing packing = Packing::Records;
  // What transformers' tokenizer(text) puts before a text: BOS (LLaMA 1/2, Llama 3.1), or
  // nothing (Qwen).
  std::vector<int64_t> prefix{1};
  int64_t eos = 2;         // what ends a training record
  int64_t vocab_size = 0;  // ids must be below it
  // chat: the template (a null jinja: the llama2 format), and whether a rendering ends with
  // the generation prompt (lorafit tokenize --add-generation-prompt)
  std::shared_ptr<const ChatTemplate> chat;
  bool add_generation_prompt = false;
};

/// The options that frame records as transformers does for this model: the tokenizer's own
/// special prefix, and as EOS tokenizer_config.json's eos_token (Llama 3 Instruct's
/// <|eot_id|>, Qwen's <|im_end|>), else config.json's first eos_token_id. For chat, the
/// template that `chat_template` chooses (see load_chat_template) from the tokenizer's folder.
DatasetOptions dataset_options(const Tokenizer& tokenizer,
                               const LlamaConfig& config,
                               const std::string& format,
                               int64_t max_seq_len,
                               Packing packing,
                               const std::string& chat_template = "model");

/// One chat record as it trains; `text`, if given, gets its rendering.
Example chat_example(const JsonRecord& record,
                     const Tokenizer& tokenizer,
                     const DatasetOptions& options,
                     std::string* text = nullptr);

/// Reads and tokenizes a dataset file into rows as options.packing says. A bad record is an
/// IoError naming file and line; so is a file with no example to train on. `records`, if
/// given, gets the file's record count.
std::vector<Example> load_examples(const std::string& path,
                                   const Tokenizer& tokenizer,
                                   const DatasetOptions& options,
                                   size_t* records = nullptr);
/// load_examples with or without a tokenizer (nullptr: format tokens only, else ConfigError).
std::vector<Example> load_examples(const std::string& path,
                                   const Tokenizer* tokenizer,
                                   const DatasetOptions& options,
                                   size_t* records = nullptr);

/// The prompt Stanford Alpaca trains with (its "input" variant when input is non-empty).
std::string alpaca_prompt(const std::string& instruction, const std::string& input);

/// Where a run is in its stream of examples: the epoch and the position in its order.
struct DataPosition {
  int64_t epoch = 0;
  int64_t cursor = 0;
};

/// Example indices in a seeded order that is reshuffled every epoch; the same seed and
/// position always give the same continuation.
class ExampleStream {
 public:
  /// reshuffle = false keeps file order in every epoch.
  ExampleStream(size_t size, uint64_t seed, DataPosition start = {}, bool reshuffle = true);
  /// The next `count` indices, crossing into new epochs as needed.
  std::vector<size_t> next(size_t count);
  DataPosition position() const { return pos_; }

 private:
  void shuffle();
  size_t size_;
  uint64_t seed_;
  DataPosition pos_;
  bool shuffle_;
  std::vector<size_t> order_;
};

}  // namespace lorafit
