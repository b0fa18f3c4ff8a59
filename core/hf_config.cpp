#include "core/hf_config.h"

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/errors.h"

namespace lorafit {

namespace {

using nlohmann::json;

struct Reader {
  const json& j;
  const std::string& path;
  std::vector<std::string> problems;

  const json* find(const json& obj, const char* key) {
    auto it = obj.find(key);
    return it == obj.end() || it->is_null() ? nullptr : &*it;
  }

  int64_t integer(const char* key, int64_t fallback, bool required, int64_t min = 1) {
    const json* v = find(j, key);
    if (!v) {
      if (required) problems.push_back("'" + std::string(key) + "' is missing");
      return fallback;
    }
    if (!v->is_number_integer() || v->get<int64_t>() < min) {
      problems.push_back("'" + std::string(key) + "' must be an integer >= " + std::to_string(min) +
                         ", got " + v->dump());
      return fallback;
    }
    return v->get<int64_t>();
  }

  double number(const json& obj, const std::string& prefix, const char* key, double fallback) {
    const json* v = find(obj, key);
    if (!v) return fallback;
    if (!v->is_number() || !std::isfinite(v->get<double>()) || v->get<double>() <= 0) {
      problems.push_back("'" + prefix + key + "' must be a positive number, got " + v->dump());
      return fallback;
    }
    return v->get<double>();
  }

  bool boolean(const char* key, bool fallback) {
    const json* v = find(j, key);
    if (!v) return fallback;
    if (!v->is_boolean()) {
      problems.push_back("'" + std::string(key) + "' must be true or false, got " + v->dump());
      return fallback;
    }
    return v->get<bool>();
  }
};

// transformers 5 keeps rope settings in `rope_parameters` (with rope_theta inside);
// transformers 4 in `rope_theta` + `rope_scaling` (whose type key is `rope_type` or `type`).
RopeConfig parse_rope(Reader& r) {
  RopeConfig rope;
  const json* params = r.find(r.j, "rope_parameters");
  const json* scaling = r.find(r.j, "rope_scaling");
  const std::string key = params ? "rope_parameters" : "rope_scaling";
  const json* block = params ? params : scaling;
  rope.theta = r.number(r.j, "", "rope_theta", rope.theta);
  if (!block) return rope;
  if (!block->is_object()) {
    r.problems.push_back("'" + key + "' must be an object, got " + block->dump());
    return rope;
  }
  const std::string prefix = key + ".";
  rope.theta = r.number(*block, prefix, "rope_theta", rope.theta);

  std::string type = "default";
  for (const char* k : {"rope_type", "type"}) {
    if (const json* t = r.find(*block, k)) {
      if (t->is_string()) type = t->get<std::string>();
      break;
    }
  }
  if (type == "default") return rope;
  if (type == "linear") {
    rope.type = RopeType::Linear;
  } else if (type == "llama3") {
    rope.type = RopeType::Llama3;
  } else {
    r.problems.push_back("'" + prefix + "rope_type' is '" + type +
                         "', which lorafit does not support (supported: default, linear, llama3)");
    return rope;
  }
  rope.factor = r.number(*block, prefix, "factor", 0.0);
  if (rope.factor == 0.0) r.problems.push_back("'" + prefix + "factor' is missing");
  if (rope.type == RopeType::Llama3) {
    rope.low_freq_factor = r.number(*block, prefix, "low_freq_factor", rope.low_freq_factor);
    rope.high_freq_factor = r.number(*block, prefix, "high_freq_factor", rope.high_freq_factor);
    rope.original_max_position_embeddings =
        static_cast<int64_t>(r.number(*block, prefix, "original_max_position_embeddings",
                                      static_cast<double>(rope.original_max_position_embeddings)));
    if (rope.high_freq_factor <= rope.low_freq_factor) {
      r.problems.push_back("'" + prefix + "high_freq_factor' must exceed low_freq_factor");
    }
  }
  return rope;
}

std::vector<int64_t> token_ids(Reader& r, const char* key, std::vector<int64_t> fallback) {
  const json* v = r.find(r.j, key);
  if (!v) return fallback;
  std::vector<int64_t> ids;
  auto take = [&](const json& x) {
    if (x.is_number_integer() && x.get<int64_t>() >= 0) {
      ids.push_back(x.get<int64_t>());
    } else {
      r.problems.push_back("'" + std::string(key) + "' must be a token id or a list of them, got " +
                           v->dump());
    }
  };
  if (v->is_array()) {
    for (const auto& x : *v) take(x);
  } else {
    take(*v);
  }
  return ids.empty() ? fallback : ids;
}

// The attention window in tokens, 0 for none. Mistral applies `sliding_window` when it is set;
// Qwen only with `use_sliding_window` (on its layers from max_window_layers on) or when
// transformers' `layer_types` lists a sliding layer.
int64_t sliding_window(Reader& r, const std::string& model_type) {
  if (model_type == "llama") return 0;
  bool applies = model_type == "mistral";
  if (model_type != "mistral") {
    applies = r.boolean("use_sliding_window", false);
    if (const json* types = r.find(r.j, "layer_types"); types && types->is_array()) {
      for (const auto& t : *types) applies = applies || t == "sliding_attention";
    }
  }
  return applies ? r.integer("sliding_window", 0, false) : 0;
}

}  // namespace

LlamaConfig parse_llama_config(const std::string& json_text, const std::string& path) {
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::exception& e) {
    throw ConfigError("config '" + path + "' is not valid JSON: " + e.what());
  }
  if (!j.is_object()) throw ConfigError("config '" + path + "' is not a JSON object");

  Reader r{j, path, {}};
  LlamaConfig c;
  if (const json* mt = r.find(j, "model_type")) {
    const bool known =
        mt->is_string() && (*mt == "llama" || *mt == "mistral" || *mt == "qwen2" || *mt == "qwen3");
    if (!known) {
      throw ConfigError("config '" + path + "': model_type is " + mt->dump() +
                        "; lorafit supports the dense decoders llama, mistral, qwen2 and qwen3 "
                        "(hint: MoE experts and vision towers are not supported)");
    }
    c.model_type = mt->get<std::string>();
  }
  for (const char* key : {"vision_config", "audio_config"}) {
    if (r.find(j, key)) {
      r.problems.push_back("'" + std::string(key) +
                           "' is present: lorafit trains text-only decoders, not a model "
                           "with a vision or audio tower");
    }
  }
  for (const char* key : {"num_experts", "num_local_experts", "n_routed_experts"}) {
    if (const json* v = r.find(j, key); v && *v != 0) {
      r.problems.push_back("'" + std::string(key) + "' is " + v->dump() +
                           ": lorafit does not support mixture-of-experts checkpoints");
    }
  }
  if (const json* qc = r.find(j, "quantization_config")) {
    const auto method = qc->is_object() ? qc->value("quant_method", json("?")).dump() : qc->dump();
    r.problems.push_back("'quantization_config' is present (quant_method " + method +
                         "): lorafit reads unquantized checkpoints only (hint: point 'model' at "
                         "the full-precision checkpoint and set quantize: nf4, which quantizes "
                         "it at load as bitsandbytes' nf4 with double quantization does)");
  }
  if (r.boolean("mlp_bias", false)) {
    r.problems.push_back("'mlp_bias' is true; lorafit supports bias-free MLPs only");
  }
  // Qwen2 always has q, k and v biases and Mistral none; LLaMA's and Qwen3's attention_bias
  // puts one on all four projections.
  const bool attention_bias =
      (c.model_type == "llama" || c.model_type == "qwen3") && r.boolean("attention_bias", false);
  c.qkv_bias = c.model_type == "qwen2" || attention_bias;
  c.o_bias = c.model_type != "qwen2" && attention_bias;
  c.qk_norm = c.model_type == "qwen3";
  c.sliding_window = sliding_window(r, c.model_type);
  if (const json* act = r.find(j, "hidden_act"); act && *act != "silu") {
    r.problems.push_back("'hidden_act' is " + act->dump() + "; lorafit supports \"silu\" only");
  }
  if (const json* tp = r.find(j, "pretraining_tp"); tp && *tp != 1) {
    r.problems.push_back("'pretraining_tp' is " + tp->dump() + "; lorafit supports 1 only");
  }

  c.hidden_size = r.integer("hidden_size", 0, true);
  c.intermediate_size = r.integer("intermediate_size", 0, true);
  c.num_hidden_layers = r.integer("num_hidden_layers", 0, true);
  c.num_attention_heads = r.integer("num_attention_heads", 1, true);
  c.num_key_value_heads = r.integer("num_key_value_heads", c.num_attention_heads, false);
  c.vocab_size = r.integer("vocab_size", 0, true);
  c.max_position_embeddings =
      r.integer("max_position_embeddings", c.max_position_embeddings, false);
  c.rms_norm_eps = r.number(j, "", "rms_norm_eps", c.rms_norm_eps);
  c.tie_word_embeddings = r.boolean("tie_word_embeddings", c.tie_word_embeddings);
  c.bos_token_id = token_ids(r, "bos_token_id", {c.bos_token_id}).front();
  c.eos_token_ids = token_ids(r, "eos_token_id", c.eos_token_ids);
  c.rope = parse_rope(r);

  if (c.num_attention_heads > 0 && c.num_key_value_heads > 0 &&
      c.num_attention_heads % c.num_key_value_heads != 0) {
    r.problems.push_back("'num_attention_heads' (" + std::to_string(c.num_attention_heads) +
                         ") must be a multiple of 'num_key_value_heads' (" +
                         std::to_string(c.num_key_value_heads) + ")");
  }
  const bool has_head_dim = r.find(j, "head_dim") != nullptr;
  c.head_dim = r.integer("head_dim", 0, false);
  if (!has_head_dim && c.num_attention_heads > 0) {
    if (c.hidden_size % c.num_attention_heads != 0) {
      r.problems.push_back(
          "'hidden_size' must be a multiple of 'num_attention_heads' when "
          "'head_dim' is absent");
    }
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  if (c.head_dim % 2 != 0) {
    r.problems.push_back("'head_dim' must be even for rotary embeddings, got " +
                         std::to_string(c.head_dim));
  }
  for (int64_t id : c.eos_token_ids) {
    if (c.vocab_size > 0 && id >= c.vocab_size) {
      r.problems.push_back("'eos_token_id' " + std::to_string(id) + " is outside the vocabulary");
    }
  }
  if (c.vocab_size > 0 && c.bos_token_id >= c.vocab_size) {
    r.problems.push_back("'bos_token_id' " + std::to_string(c.bos_token_id) +
                         " is outside the vocabulary");
  }
  if (!r.problems.empty()) {
    throw ConfigError("config '" + path + "': " + join_problems(r.problems));
  }
  return c;
}

LlamaConfig load_llama_config(const std::string& model_dir) {
  const std::string path = model_dir + "/config.json";
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw IoError("cannot read '" + path +
                  "' (hint: --model must be a Hugging Face model folder holding config.json)");
  }
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_llama_config(ss.str(), path);
}

void check_sliding_window(const LlamaConfig& c, int64_t tokens, const std::string& where) {
  if (c.sliding_window > 0 && tokens > c.sliding_window) {
    throw ConfigError(where + ": " + std::to_string(tokens) + " tokens reach past the model's " +
                      "sliding attention window of " + std::to_string(c.sliding_window) +
                      ", which lorafit does not implement (hint: keep data.max_seq_len and "
                      "generated lengths at most " +
                      std::to_string(c.sliding_window) + ")");
  }
}

}  // namespace lorafit
