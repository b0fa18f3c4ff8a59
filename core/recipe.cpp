#include "core/recipe.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <sstream>

#include "adapters/registry.h"
#include "core/errors.h"
#include "core/hf_config.h"
#include "tokenizer/tokenizer.h"

namespace lorafit {

namespace {

namespace fs = std::filesystem;

// The shortest decimal that reads back as exactly `v` (0.005, not 0.0050000000000000001).
std::string number_text(double v) {
  char buf[32];
  for (int digits = 1; digits <= 17; ++digits) {
    std::snprintf(buf, sizeof(buf), "%.*g", digits, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  return buf;
}

// Longer sequences than any GPU trains today; a typo such as 1e11 stops here, not in the
// allocator.
constexpr double kMaxSeqLen = 1 << 24;

// What a field accepts beyond its type.
struct Rule {
  bool required = false;
  std::optional<double> min;  // inclusive
  std::optional<double> max;  // inclusive
  bool positive = false;      // > 0
  bool below_one = false;     // < 1
  std::vector<std::string> one_of;
  std::string hint;  // added to a value out of range
};

Rule required() {
  Rule r;
  r.required = true;
  return r;
}
Rule at_least(double min) {
  Rule r;
  r.min = min;
  return r;
}
Rule between(double min, double max, std::string hint) {
  Rule r;
  r.min = min;
  r.max = max;
  r.hint = std::move(hint);
  return r;
}
Rule positive() {
  Rule r;
  r.positive = true;
  return r;
}
Rule probability() {
  Rule r;
  r.min = 0.0;
  r.below_one = true;
  return r;
}
Rule one_of(std::vector<std::string> values) {
  Rule r;
  r.one_of = std::move(values);
  return r;
}

// Every recipe key, in the order the resolved recipe prints them. One list serves reading,
// printing, and the did-you-mean hints.
template <class Recipe_, class F>
void visit_fields(Recipe_& r, F&& f) {
  f("model", r.model, required());
  f("output", r.output, required());
  f("seed", r.seed, at_least(0));
  f("device", r.device, one_of({"auto", "cpu", "cuda"}));
  f("dtype", r.dtype, one_of({"auto", "bf16", "f16", "f32"}));
  f("quantize", r.quantize, one_of({"none", "nf4"}));
  f("data.train", r.data.train, required());
  f("data.valid", r.data.valid, Rule{});
  f("data.format", r.data.format, one_of({"text", "alpaca", "chat", "tokens"}));
  f("data.chat_template", r.data.chat_template, Rule{});
  f("data.max_seq_len", r.data.max_seq_len,
    between(2, kMaxSeqLen, "tokens per sequence, e.g. 2048"));
  f("data.packing", r.data.packing, one_of({"true", "false", "concat"}));
  f("data.shuffle", r.data.shuffle, Rule{});
  f("data.allow_longer_context", r.data.allow_longer_context, Rule{});
  f("adapter.type", r.adapter.type, Rule{});
  f("adapter.r", r.adapter.r, at_least(1));
  f("adapter.alpha", r.adapter.alpha, positive());
  f("adapter.dropout", r.adapter.dropout, probability());
  f("adapter.targets", r.adapter.targets, Rule{});
  f("adapter.use_rslora", r.adapter.use_rslora, Rule{});
  f("adapter.init", r.adapter.init, Rule{});
  for (const auto& key : strategy_keys()) {
    Rule rule;
    rule.min = key.min;
    rule.below_one = key.below_one;
    rule.one_of = key.one_of;
    f("adapter." + key.name, r.adapter.options[key.name], rule);
  }
  f("train.steps", r.train.steps, at_least(0));
  f("train.epochs", r.train.epochs, at_least(0));
  f("train.batch_size", r.train.batch_size, at_least(1));
  f("train.micro_batch_size", r.train.micro_batch_size, at_least(1));
  f("train.gradient_accumulation_steps", r.train.gradient_accumulation_steps, at_least(0));
  f("train.lr", r.train.lr, positive());
  f("train.schedule", r.train.schedule, one_of({"constant", "linear", "cosine"}));
  f("train.warmup_steps", r.train.warmup_steps, at_least(0));
  f("train.warmup_ratio", r.train.warmup_ratio, probability());
  f("train.weight_decay", r.train.weight_decay, at_least(0));
  f("train.max_grad_norm", r.train.max_grad_norm, at_least(0));
  f("train.gradient_checkpointing", r.train.gradient_checkpointing, Rule{});
  f("train.checkpoint_keep", r.train.checkpoint_keep, Rule{});
  f("train.cuda_graphs", r.train.cuda_graphs, Rule{});
  f("train.log_every", r.train.log_every, at_least(1));
  f("train.eval_every", r.train.eval_every, at_least(0));
  f("train.save_every", r.train.save_every, at_least(0));
  f("train.save_total_limit", r.train.save_total_limit, at_least(0));
  f("cola.links", r.cola.links, at_least(0));
  f("cola.knots", r.cola.knots, Rule{});
  f("cola.ranks", r.cola.ranks, Rule{});
  f("cola.lr_restart", r.cola.lr_restart, one_of({"none", "rewarm"}));
  f("longlora.group_ratio", r.longlora.group_ratio, positive());
  f("longlora.shift", r.longlora.shift, one_of({"roll", "nowrap", "none"}));
  f("longlora.trainable", r.longlora.trainable, Rule{});
  f("longlora.rope_scale", r.longlora.rope_scale, Rule{});
  f("distributed.timeout_s", r.distributed.timeout_s, at_least(1));
  f("distributed.bucket_mb", r.distributed.bucket_mb, positive());
}

std::vector<std::string> split(const std::string& key, char sep) {
  std::vector<std::string> parts;
  std::stringstream ss(key);
  for (std::string p; std::getline(ss, p, sep);) parts.push_back(p);
  return parts;
}

// yaml-cpp's Node::operator= writes through to the node it refers to; reset() rebinds.
YAML::Node find(const YAML::Node& root, const std::string& key) {
  YAML::Node node;
  node.reset(root);
  for (const auto& part : split(key, '.')) {
    if (!node.IsMap()) return YAML::Node(YAML::NodeType::Undefined);
    const YAML::Node child = static_cast<const YAML::Node&>(node)[part];
    if (!child.IsDefined()) return child;
    node.reset(child);
  }
  return node;
}

std::string where(const YAML::Node& n) {
  return n.Mark().line >= 0 ? " (line " + std::to_string(n.Mark().line + 1) + ")" : "";
}

// Calls f with a value of the C++ type that `value` (a strategy key's default) holds: int64_t,
// double, bool or std::string.
template <class F>
void with_json_type(const nlohmann::json& value, F&& f) {
  if (value.is_number_integer()) {
    f(value.get<int64_t>());
  } else if (value.is_number()) {
    f(value.get<double>());
  } else if (value.is_boolean()) {
    f(value.get<bool>());
  } else {
    f(value.get<std::string>());
  }
}

struct Reader {
  const YAML::Node& root;
  std::vector<std::string>& problems;

  template <class T>
  void operator()(const std::string& key, T& value, const Rule& rule) {
    const YAML::Node n = find(root, key);
    if (!n.IsDefined() || n.IsNull()) {
      if (rule.required) problems.push_back("'" + key + "' is required");
      return;
    }
    if constexpr (std::is_same_v<T, nlohmann::json>) {
      // A strategy's key: typed by its default.
      with_json_type(value, [&](auto typed) {
        if (!read(key, n, typed)) return;
        check(key, n, typed, rule);
        value = typed;
      });
    } else {
      if (!read(key, n, value)) return;
      check(key, n, value, rule);
    }
  }

  bool read(const std::string& key, const YAML::Node& n, std::vector<std::string>& value) {
    const bool targets = key == "adapter.targets";
    if (targets && n.IsScalar() && n.Scalar() == "all-linear") {
      value = kProjectionKinds;
      return true;
    }
    if (!n.IsSequence()) {
      problems.push_back("'" + key + "' must be a list of " +
                         (targets ? "module names or all-linear" : "names") + where(n));
      return false;
    }
    value.clear();
    for (const auto& item : n) {
      if (!item.IsScalar()) {
        // "gate_up: 14" in a flow list is a one-pair map, "gate_up:14" the item meant.
        problems.push_back("'" + key + "' must list " + (targets ? "module names" : "names") +
                           where(n) +
                           (item.IsMap() && key == "train.checkpoint_keep"
                                ? " (hint: 'name: value' with a space is a map; a layer count "
                                  "is written gate_up:14)"
                                : ""));
        return false;
      }
      value.push_back(item.Scalar());
    }
    return true;
  }

  template <class T>
  bool read(const std::string& key, const YAML::Node& n, std::vector<T>& value) {
    const char* expected = std::is_same_v<T, int64_t> ? "integers" : "numbers";
    if (!n.IsSequence()) {
      problems.push_back("'" + key + "' must be a list of " + expected + where(n));
      return false;
    }
    value.clear();
    for (const auto& item : n) {
      T x{};
      if (!read(key, item, x)) return false;
      value.push_back(x);
    }
    return true;
  }

  template <class T>
  bool read(const std::string& key, const YAML::Node& n, T& value) {
    const char* expected = std::is_same_v<T, bool>      ? "true or false"
                           : std::is_same_v<T, int64_t> ? "an integer"
                           : std::is_same_v<T, double>  ? "a number"
                                                        : "a string";
    try {
      if (!n.IsScalar()) throw YAML::BadConversion(n.Mark());
      value = n.as<T>();
      return true;
    } catch (const YAML::BadConversion&) {
      std::string got, hint;
      if (n.IsScalar()) {
        got = ", got " + n.Scalar();
        char* end = nullptr;
        std::strtod(n.Scalar().c_str(), &end);
        if (std::is_same_v<T, int64_t> && end != n.Scalar().c_str() && *end == '\0')
          hint = " (hint: write a whole number without a decimal point or exponent)";
      }
      problems.push_back("'" + key + "' must be " + expected + got + where(n) + hint);
      return false;
    }
  }

  template <class T>
  void check(const std::string& key, const YAML::Node& n, const T& value, const Rule& rule) {
    if constexpr (std::is_arithmetic_v<T> && !std::is_same_v<T, bool>) {
      const double v = static_cast<double>(value);
      std::string expected;
      if (rule.min && v < *rule.min) expected = ">= " + fmt_num(*rule.min);
      if (rule.max && v > *rule.max) expected = "<= " + fmt_num(*rule.max);
      if (rule.positive && !(v > 0)) expected = "> 0";
      if (rule.below_one && !(v < 1)) expected = "in [0, 1)";
      if (!expected.empty()) {
        problems.push_back("'" + key + "' must be " + expected + ", got " + n.Scalar() + where(n) +
                           (rule.hint.empty() ? "" : " (hint: " + rule.hint + ")"));
      }
    }
    if constexpr (std::is_same_v<T, std::string>) {
      if (!rule.one_of.empty() &&
          std::find(rule.one_of.begin(), rule.one_of.end(), value) == rule.one_of.end()) {
        std::string list;
        for (const auto& o : rule.one_of) list += (list.empty() ? "" : " | ") + o;
        problems.push_back("'" + key + "' is '" + value + "', expected " + list +
                           did_you_mean(value, rule.one_of) + where(n));
      }
    }
  }

  static std::string fmt_num(double v) { return number_text(v); }
};

// Keys of the YAML tree that no field accepts.
void unknown_keys(const YAML::Node& node,
                  const std::string& prefix,
                  const std::set<std::string>& known,
                  const std::vector<std::string>& known_list,
                  std::vector<std::string>& problems) {
  if (!node.IsMap()) return;
  for (const auto& kv : node) {
    const std::string key = prefix + kv.first.as<std::string>();
    if (known.count(key)) continue;
    const bool group = std::any_of(known_list.begin(), known_list.end(), [&](const std::string& k) {
      return k.rfind(key + ".", 0) == 0;
    });
    if (group) {
      if (!kv.second.IsMap())
        problems.push_back("'" + key + "' must be a mapping of keys" + where(kv.second));
      unknown_keys(kv.second, key + ".", known, known_list, problems);
      continue;
    }
    if (prefix.empty() && (key == "jobs" || key == "max_concurrent")) continue;
    problems.push_back("unknown key '" + key + "'" + did_you_mean(key, known_list) +
                       where(kv.first));
  }
}

void apply_override(YAML::Node& root,
                    const std::string& assignment,
                    std::vector<std::string>& problems) {
  const auto eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0) {
    problems.push_back("--set '" + assignment + "' must look like key.path=value");
    return;
  }
  const auto parts = split(assignment.substr(0, eq), '.');
  YAML::Node value;
  try {
    value = YAML::Load(assignment.substr(eq + 1));
  } catch (const YAML::Exception& e) {
    problems.push_back("--set '" + assignment + "': the value is not valid YAML (" + e.msg + ")");
    return;
  }
  YAML::Node node;
  node.reset(root);
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    if (!node[parts[i]].IsMap()) node[parts[i]] = YAML::Node(YAML::NodeType::Map);
    YAML::Node child = node[parts[i]];
    node.reset(child);
  }
  node[parts.back()] = value;
}

// The adapter types whose strategy has `capability`, as a phrase: "a, b or c".
std::string types_that(bool AdapterSpec::*capability) {
  std::vector<std::string> names;
  for (const auto& spec : adapter_specs())
    if (spec.*capability && !spec.trains_base) names.emplace_back(spec.name);
  std::string out;
  for (size_t i = 0; i < names.size(); ++i)
    out += (i == 0 ? "" : i + 1 == names.size() ? " or " : ", ") + names[i];
  return out;
}

void check_cola(const Recipe& r, std::vector<std::string>& problems) {
  const auto& c = r.cola;
  const auto* spec = find_adapter_if(r.adapter.type);
  if (spec && !spec->chains) {
    problems.push_back("'cola' chains " + types_that(&AdapterSpec::chains) +
                       " adapters, not adapter.type '" + r.adapter.type + "'");
  }
  if (c.links > 0 && !c.knots.empty() && c.links != c.link_count()) {
    problems.push_back("'cola.links' is " + std::to_string(c.links) + " but 'cola.knots' makes " +
                       std::to_string(c.link_count()) + " links (hint: set one of them)");
  }
  for (size_t i = 0; i < c.knots.size(); ++i) {
    if (!(c.knots[i] > 0 && c.knots[i] < 1) || (i > 0 && !(c.knots[i] > c.knots[i - 1]))) {
      problems.push_back("'cola.knots' must be ascending fractions of the steps in (0, 1)");
      break;
    }
  }
  if (!c.ranks.empty() && static_cast<int64_t>(c.ranks.size()) != c.link_count()) {
    problems.push_back("'cola.ranks' lists " + std::to_string(c.ranks.size()) +
                       " ranks for a chain of " + std::to_string(c.link_count()) + " links");
  }
  for (auto rank : c.ranks) {
    if (rank < 1) {
      problems.push_back("'cola.ranks' must be ranks >= 1, got " + std::to_string(rank));
      break;
    }
  }
  if (!r.adapter.init.empty()) {
    problems.push_back(
        "'adapter.init' cannot start a cola chain (hint: merge it into the model "
        "first)");
  }
}

void check_longlora(const Recipe& r, std::vector<std::string>& problems) {
  const auto& l = r.longlora;
  if (l.rope_scale != "auto") {
    char* end = nullptr;
    const double f = std::strtod(l.rope_scale.c_str(), &end);
    if (end == l.rope_scale.c_str() || *end != '\0' || !(f >= 1)) {
      problems.push_back("'longlora.rope_scale' is '" + l.rope_scale +
                         "', expected auto or a factor >= 1");
    }
  }
  for (const auto& t : l.trainable) {
    if (t != "embed" && t != "norm") {
      problems.push_back("'longlora.trainable' lists '" + t + "', expected embed and/or norm" +
                         did_you_mean(t, {"embed", "norm"}));
    }
  }
  const auto* spec = find_adapter_if(r.adapter.type);
  if (!l.trainable.empty() && ((spec && !spec->with_trainable_base) || r.cola.enabled())) {
    problems.push_back(
        "'longlora.trainable' goes with a " + types_that(&AdapterSpec::with_trainable_base) +
        " adapter, not " +
        std::string(r.cola.enabled() ? "a cola chain" : "adapter.type " + r.adapter.type));
  }
  if (l.group_ratio > 1) {
    problems.push_back("'longlora.group_ratio' must be in (0, 1], got " +
                       std::to_string(l.group_ratio));
    return;
  }
  // Concatenated text is cut into blocks of max_seq_len: each must split into (even) groups.
  const bool blocks = r.data.format == "text" && r.data.packing == "concat";
  const double group = l.group_ratio * static_cast<double>(r.data.max_seq_len);
  const bool even = l.shift == "none" || std::fmod(group, 2.0) == 0.0;
  const double multiple = 2.0 / l.group_ratio;  // batches are padded to a multiple of it
  if (!blocks && multiple != std::floor(multiple)) {
    problems.push_back("'longlora.group_ratio' " + std::to_string(l.group_ratio) +
                       ": batches of records are padded to a length that splits into even "
                       "groups, which needs 2 / group_ratio to be whole (hint: 0.25, 0.5, 1)");
  }
  if (blocks && (group != std::floor(group) || !even)) {
    problems.push_back("'longlora.group_ratio' " + std::to_string(l.group_ratio) +
                       " of data.max_seq_len " + std::to_string(r.data.max_seq_len) +
                       " tokens is not a whole" + (even ? "" : ", even") +
                       " number of tokens per group (hint: a max_seq_len that 1 / group_ratio "
                       "divides twice over)");
  }
}

// A max_seq_len past the positions the model was trained on gives RoPE angles it never saw:
// refused unless a longlora block interpolates them or the recipe says it means it.
void check_context(const Recipe& r, int64_t positions, std::vector<std::string>& problems) {
  if (r.data.allow_longer_context || positions <= 0) return;
  double factor = 1;
  std::string scaled;
  if (r.longlora.enabled) {
    try {
      factor = rope_scale_factor(r.longlora, r.data.max_seq_len, positions);
    } catch (const std::exception&) {
      return;  // a malformed rope_scale is reported by check_longlora
    }
    scaled = " x longlora.rope_scale " + number_text(factor);
  }
  if (static_cast<double>(r.data.max_seq_len) <= static_cast<double>(positions) * factor) return;
  problems.push_back("'data.max_seq_len' is " + std::to_string(r.data.max_seq_len) +
                     ", more than the " + std::to_string(positions) + " positions" + scaled +
                     " of model '" + r.model +
                     "' (max_position_embeddings) (hint: train at most that long; a longlora "
                     "block interpolates RoPE to train longer; data.allow_longer_context: true "
                     "trains past it without interpolation)");
}

// Settings that can be spelled two ways must be spelled one way in `tree`.
void check_spelled_once(const YAML::Node& tree,
                        const Recipe& r,
                        std::vector<std::string>& problems) {
  if (r.train.gradient_accumulation_steps > 0 && find(tree, "train.batch_size").IsDefined()) {
    problems.push_back(
        "set one of 'train.batch_size' and 'train.gradient_accumulation_steps' (hint: "
        "batch_size = gradient_accumulation_steps x micro_batch_size x WORLD_SIZE)");
  }
  if (r.train.warmup_ratio > 0 && find(tree, "train.warmup_steps").IsDefined()) {
    problems.push_back("set one of 'train.warmup_steps' and 'train.warmup_ratio'");
  }
}

// Checks that need several fields or, with check_files, the file system.
void check_recipe(const Recipe& r, bool check_files, std::vector<std::string>& problems) {
  if (check_files && !r.model.empty()) {
    if (!fs::is_regular_file(fs::path(r.model) / "config.json")) {
      problems.push_back("'model': '" + r.model +
                         "' is not a Hugging Face model folder (no config.json)");
    } else {
      try {
        const auto config = load_llama_config(r.model);
        check_context(r, config.max_position_embeddings, problems);
        try {
          check_sliding_window(config, r.data.max_seq_len, "'data.max_seq_len'");
        } catch (const ConfigError& e) {
          problems.push_back(e.what());
        }
      } catch (const Error& e) {
        problems.push_back(std::string("'model': ") + e.what());
      }
      if (!has_tokenizer(r.model)) {
        problems.push_back("'model': '" + r.model +
                           "' has no tokenizer.json or tokenizer.model (hint: copy the model's "
                           "tokenizer files beside its config.json)");
      }
    }
  }
  if (r.data.packing == "concat" && r.data.format != "text") {
    problems.push_back(
        "'data.packing' concat runs text documents into each other, but "
        "data.format is '" +
        r.data.format + "' (hint: packing: true packs whole records apart)");
  }
  if (r.data.chat_template != "model" && r.data.format != "chat") {
    problems.push_back("'data.chat_template' is set but data.format is '" + r.data.format +
                       "' (hint: data.format: chat)");
  }
  if (check_files && r.data.chat_template != "model" && r.data.chat_template != "llama2" &&
      !fs::is_regular_file(r.data.chat_template)) {
    problems.push_back("'data.chat_template': '" + r.data.chat_template +
                       "' is neither model, llama2 nor a template file");
  }
  for (const auto& [key, path] :
       {std::pair{"data.train", r.data.train}, {"data.valid", r.data.valid}}) {
    if (check_files && !path.empty() && path != "-" && !fs::is_regular_file(path)) {
      problems.push_back("'" + std::string(key) + "': file '" + path + "' does not exist");
    }
  }
  if (check_files && !r.adapter.init.empty() &&
      !fs::is_regular_file(fs::path(r.adapter.init) / "adapter_model.safetensors") &&
      !fs::is_regular_file(fs::path(r.adapter.init) / "adapter_model.bin")) {
    problems.push_back("'adapter.init': '" + r.adapter.init +
                       "' holds neither adapter_model.safetensors nor adapter_model.bin");
  }
  if ((r.train.steps > 0) == (r.train.epochs > 0)) {
    problems.push_back("set exactly one of 'train.steps' and 'train.epochs'");
  }
  if (r.train.gradient_accumulation_steps == 0 &&
      (r.train.micro_batch_size > r.train.batch_size ||
       r.train.batch_size % r.train.micro_batch_size != 0)) {
    problems.push_back("'train.batch_size' (" + std::to_string(r.train.batch_size) +
                       ") must be a multiple of 'train.micro_batch_size' (" +
                       std::to_string(r.train.micro_batch_size) + ")");
  }
  const std::vector<std::string> keepable{"attention", "residual", "gate_up"};
  std::set<std::string> kept;
  for (const auto& k : r.train.checkpoint_keep) {
    const auto item = checkpoint_keep_item(k);
    if (!item) {
      problems.push_back("'train.checkpoint_keep' lists '" + k +
                         "', whose layer count after ':' is not a positive integer (e.g. "
                         "gate_up:14 keeps gate_up in the first 14 layers)");
    } else if (std::find(keepable.begin(), keepable.end(), item->what) == keepable.end()) {
      problems.push_back("'train.checkpoint_keep' lists '" + item->what +
                         "', expected any of attention, residual and gate_up" +
                         did_you_mean(item->what, keepable));
    } else if (!kept.insert(item->what).second) {
      problems.push_back("'train.checkpoint_keep' lists '" + item->what + "' twice");
    }
  }
  if (!r.train.checkpoint_keep.empty() && !r.train.gradient_checkpointing) {
    problems.push_back(
        "'train.checkpoint_keep' says what checkpointed layers keep, but "
        "train.gradient_checkpointing is false (hint: set it true, or drop checkpoint_keep)");
  }
  if (r.train.cuda_graphs && r.train.gradient_checkpointing && r.adapter.dropout > 0) {
    problems.push_back(
        "'train.cuda_graphs' with train.gradient_checkpointing needs adapter.dropout 0: the "
        "recomputation replays dropout's random state, which a graph cannot read (hint: set "
        "adapter.dropout: 0, or drop one of the two)");
  }
  std::vector<std::string> types;
  for (const auto& spec : adapter_specs()) types.emplace_back(spec.name);
  const auto* spec = find_adapter_if(r.adapter.type);
  if (!spec) {
    problems.push_back("'adapter.type' is '" + r.adapter.type + "', expected one of: " +
                       join_problems(types) + did_you_mean(r.adapter.type, types));
  }
  if (r.train.cuda_graphs && r.cola.enabled()) {
    problems.push_back(
        "'train.cuda_graphs' with cola: each link starts new adapter tensors, which the graphs "
        "captured before do not read (hint: drop one of the two)");
  }
  if (r.train.cuda_graphs && spec && spec->aux_loss) {
    problems.push_back("'train.cuda_graphs': adapter.type " + r.adapter.type +
                       " routes each token on the host's count of its experts' rows, which a "
                       "graph cannot replay (hint: drop cuda_graphs for this adapter)");
  }
  if (r.adapter.targets.empty()) problems.push_back("'adapter.targets' is empty");
  if (spec && spec->trains_base && !r.adapter.init.empty()) {
    problems.push_back("'adapter.init' starts an adapter, but adapter.type " + r.adapter.type +
                       " trains the model itself (hint: point 'model' at the weights to start "
                       "from)");
  }
  if (spec && spec->trains_base && r.quantize == "nf4") {
    problems.push_back("'quantize': nf4 freezes the base in 4 bits, but adapter.type " +
                       r.adapter.type +
                       " trains the model itself (hint: quantize: none, or an adapter such as "
                       "lora for QLoRA)");
  }
  if (spec && spec->check) spec->check(adapter_settings(r.adapter), problems);
  if (r.cola.enabled()) check_cola(r, problems);
  if (r.longlora.enabled) check_longlora(r, problems);
  std::set<std::string> seen;
  for (const auto& t : r.adapter.targets) {
    if (std::find(kProjectionKinds.begin(), kProjectionKinds.end(), t) == kProjectionKinds.end()) {
      problems.push_back("'adapter.targets': the model has no module '" + t + "'" +
                         did_you_mean(t, kProjectionKinds) +
                         " (LLaMA has q_proj, k_proj, v_proj, o_proj, "
                         "gate_proj, up_proj, down_proj)");
    } else if (!seen.insert(t).second) {
      problems.push_back("'adapter.targets' lists '" + t + "' twice");
    }
  }
}

// Keys given twice in one mapping, anywhere in the tree: YAML forbids them, and yaml-cpp
// would silently keep the first.
void duplicate_keys(const YAML::Node& node,
                    const std::string& prefix,
                    std::vector<std::string>& problems) {
  if (node.IsSequence()) {
    const auto list = prefix.empty() ? prefix : prefix.substr(0, prefix.size() - 1);  // "jobs"
    for (size_t i = 0; i < node.size(); ++i)
      duplicate_keys(node[i], list + "[" + std::to_string(i) + "].", problems);
    return;
  }
  if (!node.IsMap()) return;
  std::map<std::string, int> first_line;
  for (const auto& kv : node) {
    if (!kv.first.IsScalar()) continue;
    const auto key = kv.first.Scalar();
    const int line = kv.first.Mark().line + 1;
    const auto [at, fresh] = first_line.emplace(key, line);
    if (!fresh) {
      problems.push_back("'" + prefix + key + "' is given twice (lines " +
                         std::to_string(at->second) + " and " + std::to_string(line) +
                         ") (hint: keep one)");
    }
    duplicate_keys(kv.second, prefix + key + ".", problems);
  }
}

YAML::Node parse_yaml(const std::string& path) {
  if (path != "-" && fs::is_directory(path)) {
    throw IoError("recipe '" + path +
                  "' is a folder, not a YAML file (hint: name the recipe file, e.g. " + path +
                  "/recipe.yaml)");
  }
  try {
    if (path == "-") return YAML::Load(std::cin);
    std::ifstream in(path);
    if (!in) throw IoError("cannot read recipe '" + path + "' (hint: check the path)");
    return YAML::Load(in);
  } catch (const YAML::Exception& e) {
    throw ConfigError("recipe '" + path + "' is not valid YAML: " + e.what());
  }
}

const std::vector<std::string> kJobKeys = {"name", "output", "seed", "data", "adapter", "train"};
const std::vector<std::string> kSharedKeys = {"model",    "device",         "dtype",
                                              "quantize", "cola",           "longlora",
                                              "jobs",     "max_concurrent", "distributed"};

bool valid_job_name(const std::string& name) {
  return !name.empty() && std::all_of(name.begin(), name.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.';
  });
}

// A job's tree: the top level without the jobs, the job's own keys over it (data, adapter
// and train key by key), its output OUTPUT/NAME unless it names one.
YAML::Node job_tree(const YAML::Node& root,
                    const YAML::Node& job,
                    const std::string& label,
                    std::vector<std::string>& problems) {
  YAML::Node merged = YAML::Clone(root);
  merged.remove("jobs");
  merged.remove("max_concurrent");
  for (const auto& kv : job) {
    const auto key = kv.first.as<std::string>();
    if (std::count(kSharedKeys.begin(), kSharedKeys.end(), key)) {
      problems.push_back(label + ": '" + key +
                         "' is shared by all jobs (hint: set it at the top of the recipe)" +
                         where(kv.first));
    } else if (!std::count(kJobKeys.begin(), kJobKeys.end(), key)) {
      problems.push_back(label + ": unknown key '" + key + "'" + did_you_mean(key, kJobKeys) +
                         where(kv.first));
    } else if (key == "data" || key == "adapter" || key == "train") {
      if (!kv.second.IsMap()) {
        problems.push_back(label + ": '" + key + "' must be a mapping of keys" + where(kv.second));
        continue;
      }
      if (!merged[key].IsMap()) merged[key] = YAML::Node(YAML::NodeType::Map);
      YAML::Node block = merged[key];
      for (const auto& item : kv.second)
        block[item.first.as<std::string>()] = YAML::Clone(item.second);
    } else if (key != "name") {
      merged[key] = YAML::Clone(kv.second);
    }
  }
  const YAML::Node out = root["output"];
  if (!job["output"].IsDefined() && out.IsDefined() && out.IsScalar())
    merged["output"] = out.Scalar() + "/" + job["name"].as<std::string>();
  return merged;
}

// Checks that concern the jobs together: unique names and outputs, and what a shared base
// allows when there are several.
void check_jobs(const Recipe& top,
                const std::vector<Recipe>& jobs,
                std::vector<std::string>& problems) {
  std::set<std::string> names, outputs;
  for (const auto& j : jobs) {
    if (!names.insert(j.name).second) problems.push_back("two jobs are named '" + j.name + "'");
    if (!outputs.insert(j.output).second)
      problems.push_back("job '" + j.name + "': output '" + j.output + "' is another job's too");
    if (jobs.size() < 2) continue;
    const std::string label = "job '" + j.name + "': ";
    if (const auto* spec = find_adapter_if(j.adapter.type); spec && !spec->in_jobs) {
      problems.push_back(label + "adapter.type " + j.adapter.type +
                         (spec->trains_base ? " trains the base, which the jobs share"
                                            : " cannot share the base with other jobs") +
                         " (hint: give it a recipe of its own)");
    }
    for (const auto& [key, same] :
         {std::pair{"gradient_checkpointing",
                    j.train.gradient_checkpointing == top.train.gradient_checkpointing},
          std::pair{"checkpoint_keep", j.train.checkpoint_keep == top.train.checkpoint_keep},
          std::pair{"cuda_graphs", j.train.cuda_graphs == top.train.cuda_graphs}}) {
      if (!same) {
        problems.push_back(label + "'train." + key +
                           "' is shared by all jobs (hint: set it at the top of the recipe)");
      }
    }
  }
  if (jobs.size() >= 2 && top.cola.enabled()) {
    problems.push_back(
        "'cola' merges adapters into the base, which the jobs share (hint: train a cola chain "
        "in a recipe of its own)");
  }
  if (jobs.size() >= 2 && !top.longlora.trainable.empty()) {
    problems.push_back(
        "'longlora.trainable' trains base tensors, which the jobs share (hint: drop it, or "
        "train that job alone)");
  }
}

// Reads `jobs:`: each job's recipe is checked whole; a problem every job has (it comes from
// the shared top level) is reported once, the others with the job's name.
std::vector<Recipe> read_jobs(const YAML::Node& root,
                              const Recipe& top,
                              bool check_files,
                              std::vector<std::string>& problems) {
  const YAML::Node list = root["jobs"];
  if (!list.IsSequence()) {
    problems.push_back(
        "'jobs' must be a list of jobs, each with name, adapter, data, train "
        "and output" +
        where(list));
    return {};
  }
  std::vector<Recipe> jobs;
  std::vector<std::vector<std::string>> own;  // each job's problems
  for (size_t i = 0; i < list.size(); ++i) {
    const YAML::Node node = list[i];
    const std::string label = "jobs[" + std::to_string(i) + "]";
    if (!node.IsMap()) {
      problems.push_back(label + " must be a mapping of keys" + where(node));
      continue;
    }
    const YAML::Node name = node["name"];
    if (!name.IsDefined() || !name.IsScalar() || !valid_job_name(name.Scalar())) {
      problems.push_back(label +
                         ": 'name' is required: letters, digits, '-', '_' or '.', "
                         "used in the job's output folder" +
                         where(node));
      continue;
    }
    Recipe job;
    job.name = name.Scalar();
    std::vector<std::string> mine;
    const YAML::Node tree = job_tree(root, node, "job '" + job.name + "'", problems);
    visit_fields(job, Reader{tree, mine});
    job.longlora.enabled = top.longlora.enabled;
    check_spelled_once(tree, job, mine);
    check_recipe(job, check_files, mine);
    jobs.push_back(job);
    own.push_back(mine);
  }
  for (size_t j = 0; j < own.size(); ++j) {
    for (const auto& p : own[j]) {
      const bool everyone = std::all_of(own.begin(), own.end(), [&](const auto& other) {
        return std::count(other.begin(), other.end(), p) > 0;
      });
      if (!everyone) {
        problems.push_back("job '" + jobs[j].name + "': " + p);
      } else if (j == 0) {
        problems.push_back(p);
      }
    }
  }
  check_jobs(top, jobs, problems);
  return jobs;
}

// Reads a recipe from its YAML tree after the overrides; `name` says where it came from.
Recipe read_recipe(YAML::Node root,
                   const std::string& name,
                   const std::vector<std::string>& overrides,
                   bool check_files) {
  if (root.IsNull()) root = YAML::Node(YAML::NodeType::Map);
  if (!root.IsMap()) throw ConfigError("recipe '" + name + "' must be a mapping of keys");

  std::vector<std::string> problems;
  duplicate_keys(root, "", problems);
  for (const auto& o : overrides) apply_override(root, o, problems);

  Recipe recipe;
  std::set<std::string> known;
  std::vector<std::string> known_list;
  visit_fields(recipe, [&](const std::string& key, auto&, const Rule&) {
    known.insert(key);
    known_list.push_back(key);
  });
  unknown_keys(root, "", known, known_list, problems);
  const YAML::Node jobs = root["jobs"];
  const bool has_jobs = jobs.IsDefined() && !(jobs.IsSequence() && jobs.size() == 0);
  // With jobs, each job's recipe is checked whole; the top level is only their defaults.
  std::vector<std::string> top_problems;
  visit_fields(recipe, Reader{root, has_jobs ? top_problems : problems});
  recipe.longlora.enabled = find(root, "longlora").IsDefined();
  if (has_jobs) {
    Reader{root, problems}("max_concurrent", recipe.max_concurrent, at_least(0));
    recipe.jobs = read_jobs(root, recipe, check_files, problems);
  } else {
    check_spelled_once(root, recipe, problems);
    check_recipe(recipe, check_files, problems);
  }
  if (!problems.empty()) {
    throw ConfigError("recipe '" + name + "' has " + std::to_string(problems.size()) +
                      (problems.size() == 1 ? " problem: " : " problems: ") +
                      join_problems(problems, /*limit=*/100));
  }
  return recipe;
}

}  // namespace

Recipe load_recipe(const std::string& path, const std::vector<std::string>& overrides) {
  return read_recipe(parse_yaml(path), path, overrides, /*check_files=*/true);
}

Recipe override_recipe(const Recipe& base, const std::vector<std::string>& overrides) {
  return read_recipe(YAML::Load(recipe_to_yaml(base)), "--set", overrides, /*check_files=*/false);
}

double rope_scale_factor(const LongLoraRecipe& l, int64_t max_seq_len, int64_t max_positions) {
  if (!l.enabled) return 1.0;
  if (l.rope_scale != "auto") return std::stod(l.rope_scale);
  return std::max(1.0,
                  std::ceil(static_cast<double>(max_seq_len) / static_cast<double>(max_positions)));
}

AdapterSettings adapter_settings(const AdapterRecipe& a) {
  return {a.r, a.alpha, a.dropout, a.use_rslora, a.targets, a.options};
}

std::vector<Recipe> recipe_jobs(const Recipe& recipe) {
  return recipe.jobs.empty() ? std::vector<Recipe>{recipe} : recipe.jobs;
}

std::optional<CheckpointKeepItem> checkpoint_keep_item(const std::string& text) {
  const auto colon = text.find(':');
  CheckpointKeepItem item{text.substr(0, colon)};
  if (colon == std::string::npos) return item;
  const auto count = text.substr(colon + 1);
  if (count.empty() || count.size() > 9 ||
      count.find_first_not_of("0123456789") != std::string::npos)
    return std::nullopt;
  item.layers = std::stoll(count);
  if (item.layers == 0) return std::nullopt;
  return item;
}

namespace {

// Whether a key means anything for the recipe's strategy and modifiers: the resolved recipe
// shows only these, and resuming compares only these.
bool applies(const Recipe& r, const std::string& key) {
  const auto& a = r.adapter;
  const auto& t = r.train;
  const auto is = [&](std::initializer_list<const char*> keys) {
    return std::any_of(keys.begin(), keys.end(), [&](const char* k) { return key == k; });
  };
  if (key.rfind("cola.", 0) == 0) {
    return r.cola.enabled() && (key != "cola.links" || r.cola.links > 0) &&
           (key != "cola.knots" || !r.cola.knots.empty()) &&
           (key != "cola.ranks" || !r.cola.ranks.empty());
  }
  if (key.rfind("longlora.", 0) == 0)
    return r.longlora.enabled && (key != "longlora.trainable" || !r.longlora.trainable.empty());
  const auto* spec = find_adapter_if(a.type);
  if (key.rfind("adapter.", 0) == 0 && a.options.contains(key.substr(8))) {
    const auto name = key.substr(8);
    const auto& keys = spec ? spec->keys : std::vector<StrategyKey>{};
    const auto own = std::find_if(keys.begin(), keys.end(),
                                  [&](const StrategyKey& k) { return k.name == name; });
    return own != keys.end() && (!own->only_when_set || a.options[name] != own->fallback);
  }
  if (key == "adapter.init") return !a.init.empty();
  if (is({"adapter.r", "adapter.alpha", "adapter.dropout", "adapter.targets",
          "adapter.use_rslora"}))
    return !(spec && spec->trains_base);
  if (key == "data.valid") return !r.data.valid.empty();
  if (key == "data.chat_template") return r.data.format == "chat";
  if (key == "data.allow_longer_context") return r.data.allow_longer_context;
  if (key == "train.steps") return t.steps > 0;
  if (key == "train.epochs") return t.epochs > 0;
  if (key == "train.batch_size") return t.gradient_accumulation_steps == 0;
  if (key == "train.gradient_accumulation_steps") return t.gradient_accumulation_steps > 0;
  if (key == "train.warmup_steps") return t.warmup_ratio == 0;
  if (key == "train.warmup_ratio") return t.warmup_ratio > 0;
  if (key == "train.save_total_limit") return t.save_total_limit > 0;
  if (key == "train.checkpoint_keep") return !t.checkpoint_keep.empty();
  if (key == "train.cuda_graphs") return t.cuda_graphs;
  const DistributedRecipe defaults;
  if (key == "distributed.timeout_s") return r.distributed.timeout_s != defaults.timeout_s;
  if (key == "distributed.bucket_mb") return r.distributed.bucket_mb != defaults.bucket_mb;
  return true;
}

YAML::Node yaml_value(const std::string& v) {
  return YAML::Node(v);
}
YAML::Node yaml_value(bool v) {
  return YAML::Node(v);
}
YAML::Node yaml_value(int64_t v) {
  return YAML::Node(std::to_string(v));
}
YAML::Node yaml_value(double v) {
  return YAML::Node(number_text(v));
}
YAML::Node yaml_value(const nlohmann::json& v) {
  YAML::Node node;
  with_json_type(v, [&](auto typed) { node = yaml_value(typed); });
  return node;
}
template <class T>
YAML::Node yaml_value(const std::vector<T>& v) {
  YAML::Node node(YAML::NodeType::Sequence);
  for (const auto& x : v) node.push_back(yaml_value(x));
  node.SetStyle(YAML::EmitterStyle::Flow);  // targets: [q_proj, v_proj]
  return node;
}

// The recipe's keys that apply, whose first part `take` accepts, with their values as YAML.
std::vector<std::pair<std::string, YAML::Node>> applied_fields(
    const Recipe& recipe, const std::function<bool(const std::string&)>& take) {
  std::vector<std::pair<std::string, YAML::Node>> out;
  visit_fields(recipe, [&](const std::string& key, auto& value, const Rule&) {
    if (take(split(key, '.')[0]) && applies(recipe, key)) out.emplace_back(key, yaml_value(value));
  });
  return out;
}

YAML::Node fields_yaml(const Recipe& recipe, const std::function<bool(const std::string&)>& take) {
  YAML::Node root(YAML::NodeType::Map);
  for (const auto& [key, value] : applied_fields(recipe, take)) {
    const auto parts = split(key, '.');
    if (parts.size() == 1) {
      root[parts[0]] = value;
    } else {
      root[parts[0]][parts[1]] = value;
    }
  }
  return root;
}

std::string flow_text(const YAML::Node& node) {
  YAML::Emitter out;
  out << YAML::Flow << node;
  return out.c_str();
}

}  // namespace

std::string recipe_to_yaml(const Recipe& recipe) {
  YAML::Node root;
  if (recipe.jobs.empty()) {
    root = fields_yaml(recipe, [](const std::string&) { return true; });
  } else {
    auto own = [](const std::string& k) {
      return std::count(kJobKeys.begin(), kJobKeys.end(), k) > 0;
    };
    root = fields_yaml(recipe, [&](const std::string& k) { return !own(k) || k == "output"; });
    root["max_concurrent"] = recipe.max_concurrent;
    for (const auto& job : recipe.jobs) {
      YAML::Node node(YAML::NodeType::Map);
      node["name"] = job.name;
      for (const auto& kv : fields_yaml(job, own)) node[kv.first] = kv.second;
      root["jobs"].push_back(node);
    }
  }
  YAML::Emitter out;
  out << root;
  return std::string(out.c_str()) + "\n";
}

Recipe parse_recipe_text(const std::string& yaml, const std::string& name) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml);
  } catch (const YAML::Exception& e) {
    throw ConfigError("recipe '" + name + "' is not valid YAML: " + e.what());
  }
  return read_recipe(root, name, {}, /*check_files=*/false);
}

const std::vector<std::string>& resume_changeable_keys() {
  static const std::vector<std::string> keys = {
      "output",           "device",           "train.steps",           "train.epochs",
      "train.log_every",  "train.eval_every", "train.save_every",      "train.save_total_limit",
      "data.valid",       "max_concurrent",   "distributed.timeout_s", "distributed.bucket_mb",
      "train.cuda_graphs"};
  return keys;
}

std::vector<std::string> resume_differences(const Recipe& saved, const Recipe& now) {
  const auto& changeable = resume_changeable_keys();
  auto texts = [&](const Recipe& r) {
    std::map<std::string, std::string> m;
    for (const auto& [key, value] : applied_fields(r, [](const std::string&) { return true; }))
      if (!std::count(changeable.begin(), changeable.end(), key)) m[key] = flow_text(value);
    return m;
  };
  const auto before = texts(saved), after = texts(now);
  std::vector<std::string> out;
  visit_fields(now, [&](const std::string& key, auto&, const Rule&) {
    const auto b = before.find(key), n = after.find(key);
    const std::string was = b == before.end() ? "(unset)" : b->second;
    const std::string is = n == after.end() ? "(unset)" : n->second;
    if (was != is) out.push_back(key + ": " + was + " -> " + is);
  });
  return out;
}

}  // namespace lorafit
