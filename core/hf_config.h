// A Hugging Face config.json of the LLaMA family (llama, mistral, qwen2, qwen3), as
// transformers 4 and 5 write it. Free of LibTorch so the fuzzer can drive it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace lorafit {

enum class RopeType { Default, Linear, Llama3 };

struct RopeConfig {
  RopeType type = RopeType::Default;
  double theta = 10000.0;
  double factor = 1.0;  // linear and llama3
  // llama3 only
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

struct LlamaConfig {
  std::string model_type = "llama";  // llama, mistral, qwen2 or qwen3
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // defaults to num_attention_heads (MHA)
  int64_t head_dim = 0;             // defaults to hidden_size / num_attention_heads
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  bool tie_word_embeddings = false;
  int64_t bos_token_id = 1;
  std::vector<int64_t> eos_token_ids{2};
  RopeConfig rope;
  // Where the families differ from LLaMA:
  bool qkv_bias = false;       // q, k and v projections have a bias (qwen2; attention_bias)
  bool o_bias = false;         // o_proj has one too (llama's and qwen3's attention_bias)
  bool qk_norm = false;        // RMSNorm over each head of q and k before RoPE (qwen3)
  int64_t sliding_window = 0;  // attention window in tokens (mistral), 0 when none
};

/// Parses config.json text. Unsupported architectures or options (another model_type, MoE
/// experts, a vision tower, yarn, MLP bias, an activation other than silu) are refused with a
/// ConfigError that names the key; `path` is used in messages.
LlamaConfig parse_llama_config(const std::string& json_text, const std::string& path);

/// Reads DIR/config.json.
LlamaConfig load_llama_config(const std::string& model_dir);

/// A ConfigError naming `where` when sequences of `tokens` would reach past the model's
/// sliding attention window, which lorafit does not implement (full causal attention equals
/// it up to the window).
void check_sliding_window(const LlamaConfig& c, int64_t tokens, const std::string& where);

}  // namespace lorafit
