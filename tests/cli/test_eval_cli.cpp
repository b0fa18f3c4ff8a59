// `lorafit eval` as a user runs it: the binary, its output and its exit codes.
#include <catch2/catch.hpp>
#include <functional>

#include "core/adapter_io.h"
#include "core/safetensors.h"
#include "test_util.h"

using namespace lorafit;
namespace fs = std::filesystem;
using lorafit::test::fixture;
using lorafit::test::run_lorafit;
constexpr auto q = lorafit::test::quote;
using lorafit::test::TempDir;

namespace {

nlohmann::json eval_json(const std::string& args, const std::string& stdin_text = "") {
  const auto r = run_lorafit("eval --json --device cpu " + args, stdin_text);
  INFO(r.err);
  REQUIRE(r.code == 0);
  return nlohmann::json::parse(r.out);
}

// Exit code 2 and one stderr line that starts with "lorafit: error:" and holds `fragment`.
void expect_user_error(const std::string& args, const std::string& fragment) {
  const auto r = run_lorafit(args);
  INFO(args << "\n" << r.err);
  REQUIRE(r.code == 2);
  REQUIRE(r.err.rfind("lorafit: error: ", 0) == 0);
  REQUIRE(std::count(r.err.begin(), r.err.end(), '\n') == 1);
  REQUIRE_THAT(r.err, Catch::Contains(fragment));
  REQUIRE(r.out.empty());
}

std::string eval_args(const std::string& model_dir, const std::string& data) {
  return "eval --device cpu --max-seq-len 24 --model " + q(model_dir) + " --data " + q(data);
}

}  // namespace

TEST_CASE("eval --json gives transformers' and PEFT's loss", "[cli][eval]") {
  for (const auto& [name, adapter] : {std::pair{"gqa_llama3", "lora_all"},
                                      {"mha_linear", "lora_rslora"},
                                      {"qwen2_bias", "lora_qkvo"},
                                      {"qwen3_norm", "lora_all"},
                                      {"mistral_swa", "lora_mlp"},
                                      {"gqa_llama3", "dora_all"},
                                      {"mha_linear", "dora_rslora"}}) {
    const std::string dir = fixture(name);
    const auto expected = lorafit::test::read_json(dir + "/expected.json");
    const auto base = eval_json("--max-seq-len 24 --model " + q(dir + "/model") + " --data " +
                                q(dir + "/eval.jsonl"));
    REQUIRE(base["loss"].get<double>() ==
            Approx(expected["base"]["loss"].get<double>()).epsilon(1e-4));
    REQUIRE(base["tokens"] == expected["base"]["tokens"]);
    REQUIRE(base["perplexity"].get<double>() == Approx(std::exp(base["loss"].get<double>())));
    const auto adapted =
        eval_json("--max-seq-len 24 --batch-size 2 --model " + q(dir + "/model") + " --adapter " +
                  q(dir + "/" + adapter) + " --data " + q(dir + "/eval.jsonl"));
    REQUIRE(adapted["loss"].get<double>() ==
            Approx(expected[adapter]["loss"].get<double>()).epsilon(1e-4));
  }
}

TEST_CASE("a PEFT DoRA adapter merged by lorafit gives PEFT's merged loss", "[cli][eval]") {
  TempDir tmp;
  for (const auto& [name, adapter] :
       {std::pair{"gqa_llama3", "dora_all"}, {"mha_linear", "dora_rslora"}}) {
    INFO(name);
    const std::string dir = fixture(name);
    const auto merged = tmp / name;
    const auto r = run_lorafit("merge --dtype f32 --model " + q(dir + "/model") + " --adapter " +
                               q(dir + "/" + adapter) + " --out " + q(merged));
    INFO(r.err);
    REQUIRE(r.code == 0);
    const auto expected = lorafit::test::read_json(dir + "/expected.json");
    const auto loss = eval_json("--max-seq-len 24 --model " + q(merged) + " --data " +
                                q(dir + "/eval.jsonl"))["loss"];
    REQUIRE(loss.get<double>() ==
            Approx(expected[std::string(adapter) + "_merged"]["loss"].get<double>()).epsilon(1e-4));
  }
}

TEST_CASE("adapters that PEFT, MoE-PEFT and LongLoRA wrote with torch.save give their loss",
          "[cli][eval]") {
  // Written on the GPU machine by scripts/gpu_seed_formats.sh with the tools' own save code:
  // PEFT's save_pretrained(safe_serialization=False), that LoRA with a LongLoRA
  // trainable_params.bin, and MoE-PEFT's save_adapter_weight of a MixLoRA with expert_lora.
  const std::string dir = fixture("trained_tiny");
  for (const char* name : {"lora_bin", "lora_bin_longlora", "moe_peft_mixlora"}) {
    INFO(name);
    const auto expected = lorafit::test::read_json(dir + "/" + name + "/expected_loss.json");
    const auto got =
        eval_json("--max-seq-len 24 --model " + q(dir + "/model") + " --adapter " +
                  q(dir + "/" + name) + " --data " + q(fixture("mha_linear") + "/eval.jsonl"));
    REQUIRE(got["tokens"] == expected["tokens"]);
    REQUIRE(got["loss"].get<double>() == Approx(expected["loss"].get<double>()).epsilon(1e-4));
  }
}

TEST_CASE("adapters saved with torch.save and LongLoRA's trainable_params.bin are read",
          "[cli][eval]") {
  TempDir tmp;
  const std::string dir = fixture("gqa_llama3");
  const auto expected = lorafit::test::read_json(dir + "/expected.json");
  const auto eval_loss = [&](const std::string& adapter) {
    return eval_json("--max-seq-len 24 --model " + q(dir + "/model") + " --adapter " + q(adapter) +
                     " --data " + q(dir + "/eval.jsonl"))["loss"]
        .get<double>();
  };
  // PEFT's LoRA as adapter_model.bin (m-LoRA and PEFT before safetensors save it so).
  const auto bin = tmp / "bin";
  fs::create_directories(bin);
  fs::copy_file(dir + "/lora_all/adapter_config.json", bin + "/adapter_config.json");
  const auto lora = read_adapter_files(dir + "/lora_all").tensors;
  save_torch_bin(bin + "/adapter_model.bin", lora);
  REQUIRE(eval_loss(bin) == Approx(expected["lora_all"]["loss"].get<double>()).epsilon(1e-4));
  // m-LoRA's adapter_config.json holds only what its LoRAConfig.export() writes.
  const auto mlora = tmp / "mlora";
  fs::create_directories(mlora);
  const auto peft_config = lorafit::test::read_json(dir + "/lora_all/adapter_config.json");
  nlohmann::json mlora_config = {{"base_model_name_or_path", "m"},
                                 {"peft_type", "LORA"},
                                 {"task_type", "CAUSAL_LM"},
                                 {"bias", "none"}};
  for (const char* key : {"lora_alpha", "lora_dropout", "r", "target_modules"})
    mlora_config[key] = peft_config[key];
  lorafit::test::write_text(mlora + "/adapter_config.json", mlora_config.dump());
  fs::copy_file(bin + "/adapter_model.bin", mlora + "/adapter_model.bin");
  REQUIRE(eval_loss(mlora) == Approx(expected["lora_all"]["loss"].get<double>()).epsilon(1e-4));
  // merge takes it as it is.
  const auto merged = run_lorafit("merge --dtype f32 --model " + q(dir + "/model") + " --adapter " +
                                  q(mlora) + " --out " + q(tmp / "merged"));
  INFO(merged.err);
  REQUIRE(merged.code == 0);
  REQUIRE(eval_json("--max-seq-len 24 --model " + q(tmp / "merged") + " --data " +
                    q(dir + "/eval.jsonl"))["loss"]
              .get<double>() == Approx(expected["lora_all"]["loss"].get<double>()).epsilon(1e-4));

  // LongLoRA: trained norms beside the adapter, named as in the model, in place of PEFT's
  // modules_to_save; the same adapter both ways gives the same loss, unlike the LoRA alone.
  torch::manual_seed(11);
  TensorMap trained = {{"model.norm.weight", 1 + 0.3 * torch::randn({32})},
                       {"model.layers.1.input_layernorm.weight", 1 + 0.3 * torch::randn({32})}};
  const auto peft = tmp / "peft";
  fs::create_directories(peft);
  auto config = lorafit::test::read_json(dir + "/lora_all/adapter_config.json");
  config["modules_to_save"] = {"norm", "input_layernorm"};
  lorafit::test::write_text(peft + "/adapter_config.json", config.dump());
  auto with_base = lora;
  for (const auto& [name, t] : trained) with_base["base_model.model." + name] = t;
  save_safetensors(peft + "/adapter_model.safetensors", with_base);
  const auto longlora = tmp / "longlora";
  fs::create_directories(longlora);
  fs::copy_file(dir + "/lora_all/adapter_config.json", longlora + "/adapter_config.json");
  save_torch_bin(longlora + "/adapter_model.bin", lora);
  save_torch_bin(longlora + "/trainable_params.bin", trained);
  const double both = eval_loss(longlora);
  REQUIRE(both == Approx(eval_loss(peft)).epsilon(1e-6));
  REQUIRE(std::abs(both - expected["lora_all"]["loss"].get<double>()) > 1e-3);

  // A pickle that would run a command: refused, and nothing runs.
  const auto evil = tmp / "evil";
  fs::create_directories(evil);
  fs::copy_file(dir + "/lora_all/adapter_config.json", evil + "/adapter_config.json");
  const auto marker = tmp / "ran";
  const std::string cmd = "touch " + marker;
  std::string pickle =
      "\x80\x02"
      "cos\nsystem\n(X";
  for (int i = 0; i < 4; ++i) pickle.push_back(static_cast<char>(cmd.size() >> (8 * i) & 0xFF));
  pickle += cmd + "tR.";
  lorafit::test::write_text(evil + "/adapter_model.bin", torch_save_archive(pickle, {}));
  expect_user_error("eval --device cpu --model " + q(dir + "/model") + " --adapter " + q(evil) +
                        " --data " + q(dir + "/eval.jsonl"),
                    "names 'os.system', which is not a tensor");
  REQUIRE_FALSE(fs::exists(marker));
}

TEST_CASE("eval reads the dataset from standard input with --data -", "[cli][eval]") {
  const std::string dir = fixture("gqa_llama3");
  const auto from_file =
      eval_json("--model " + q(dir + "/model") + " --data " + q(dir + "/eval.jsonl"));
  const auto from_stdin = eval_json("--model " + q(dir + "/model") + " --data -",
                                    lorafit::test::read_text(dir + "/eval.jsonl"));
  REQUIRE(from_stdin == from_file);
}

TEST_CASE("eval prints a readable line without --json", "[cli][eval]") {
  const std::string dir = fixture("gqa_llama3");
  const auto r = run_lorafit("eval --device cpu --model " + q(dir + "/model") + " --data " +
                             q(dir + "/eval.jsonl"));
  REQUIRE(r.code == 0);
  REQUIRE_THAT(r.out, Catch::StartsWith("loss ") && Catch::Contains("perplexity") &&
                          Catch::Contains("tokens"));
}

TEST_CASE("broken inputs exit 2 with a message naming the problem", "[cli][errors]") {
  TempDir tmp;
  const std::string data = fixture("gqa_llama3/eval.jsonl");
  // A writable copy of a model folder, broken by `breaker`.
  auto broken_model = [&](const std::string& name,
                          const std::function<void(const std::string&)>& breaker) {
    const auto dir = lorafit::test::copy_fixture("gqa_llama3/model", tmp / name);
    breaker(dir);
    return dir;
  };
  auto edit_config = [](const std::string& dir, const std::function<void(nlohmann::json&)>& edit) {
    auto j = lorafit::test::read_json(dir + "/config.json");
    edit(j);
    lorafit::test::write_text(dir + "/config.json", j.dump());
  };
  auto st_bytes = [](const std::string& dir) {
    return lorafit::test::read_text(dir + "/model.safetensors");
  };

  SECTION("missing model folder") {
    expect_user_error(eval_args(tmp / "nowhere", data), "nowhere/config.json");
  }
  SECTION("missing tokenizer") {
    const auto dir =
        broken_model("m", [](const std::string& d) { fs::remove(d + "/tokenizer.model"); });
    expect_user_error(eval_args(dir, data), "tokenizer.model' not found");
  }
  SECTION("config.json is not JSON") {
    const auto dir = broken_model(
        "m", [](const std::string& d) { lorafit::test::write_text(d + "/config.json", "{"); });
    expect_user_error(eval_args(dir, data), "config.json' is not valid JSON");
  }
  SECTION("another architecture") {
    const auto dir = broken_model("m", [&](const std::string& d) {
      edit_config(d, [](auto& j) { j["model_type"] = "gpt2"; });
    });
    expect_user_error(eval_args(dir, data), "model_type is \"gpt2\"");
  }
  SECTION("yarn rope") {
    const auto dir = broken_model("m", [&](const std::string& d) {
      edit_config(d, [](auto& j) { j["rope_parameters"]["rope_type"] = "yarn"; });
    });
    expect_user_error(eval_args(dir, data), "'yarn', which lorafit does not support");
  }
  SECTION("config disagrees with the weights") {
    const auto dir = broken_model("m", [&](const std::string& d) {
      edit_config(d, [](auto& j) { j["intermediate_size"] = 80; });
    });
    expect_user_error(
        eval_args(dir, data),
        "'model.layers.0.mlp.gate_proj.weight' has shape [64, 32], expected [80, 32]");
  }
  SECTION("truncated safetensors") {
    const auto dir = broken_model("m", [&](const std::string& d) {
      const auto bytes = st_bytes(d);
      lorafit::test::write_text(d + "/model.safetensors", bytes.substr(0, bytes.size() / 2));
    });
    expect_user_error(eval_args(dir, data), "model.safetensors': tensor");
  }
  SECTION("safetensors header that lies about its length") {
    const auto dir = broken_model("m", [&](const std::string& d) {
      auto bytes = st_bytes(d);
      bytes[4] = 1;  // declares a header of over 4 GB
      lorafit::test::write_text(d + "/model.safetensors", bytes);
    });
    expect_user_error(eval_args(dir, data), "declares a header of");
  }
  SECTION("unknown dtype in safetensors") {
    const auto dir = broken_model("m", [&](const std::string& d) {
      auto bytes = st_bytes(d);
      const auto at = bytes.find("\"F32\"");
      bytes.replace(at, 5, "\"F8X\"");
      lorafit::test::write_text(d + "/model.safetensors", bytes);
    });
    expect_user_error(eval_args(dir, data), "has dtype 'F8X'");
  }
  SECTION("missing shard") {
    const auto dir = lorafit::test::copy_fixture("mha_linear/model", tmp / "sharded");
    fs::remove(dir + "/model-00003-of-00004.safetensors");
    expect_user_error(eval_args(dir, data), "model-00003-of-00004.safetensors' listed in");
  }
  SECTION("adapter for another model") {
    expect_user_error(eval_args(fixture("mha_linear/model"), data) + " --adapter " +
                          q(fixture("gqa_llama3/lora_all")),
                      "does not fit the model");
  }
  SECTION("adapter of an unknown kind") {
    const auto ad = lorafit::test::copy_fixture("gqa_llama3/lora_all", tmp / "ad");
    auto j = lorafit::test::read_json(ad + "/adapter_config.json");
    j["peft_type"] = "PREFIX_TUNING";
    lorafit::test::write_text(ad + "/adapter_config.json", j.dump());
    expect_user_error(eval_args(fixture("gqa_llama3/model"), data) + " --adapter " + q(ad),
                      "peft_type 'PREFIX_TUNING'");
  }
  SECTION("bad dataset line") {
    lorafit::test::write_text(tmp / "bad.jsonl", "{\"text\": \"ok\"}\n\n{\"txt\": \"typo\"}\n");
    expect_user_error(eval_args(fixture("gqa_llama3/model"), tmp / "bad.jsonl"),
                      "bad.jsonl:3: expected a JSON object");
  }
  SECTION("dataset line that is not JSON") {
    lorafit::test::write_text(tmp / "bad.jsonl", "{\"text\": \"ok\"}\n{oops\n");
    expect_user_error(eval_args(fixture("gqa_llama3/model"), tmp / "bad.jsonl"),
                      "bad.jsonl:2: not valid JSON");
  }
  SECTION("missing dataset") {
    expect_user_error(eval_args(fixture("gqa_llama3/model"), tmp / "none.jsonl"),
                      "cannot read dataset");
  }
  SECTION("empty dataset") {
    lorafit::test::write_text(tmp / "empty.jsonl", "\n");
    expect_user_error(eval_args(fixture("gqa_llama3/model"), tmp / "empty.jsonl"),
                      "no token to score");
  }
  SECTION("usage errors") {
    expect_user_error("eval --model x", "--data is required");
    expect_user_error("eval --model x --data y --batch-size 0", "--batch-size");
    expect_user_error("frobnicate", "frobnicate");
  }
}

TEST_CASE("lorafit --help exits 0 and lists the commands", "[cli]") {
  const auto r = run_lorafit("--help");
  REQUIRE(r.code == 0);
  REQUIRE_THAT(r.out, Catch::Contains("eval"));
}

TEST_CASE("generate reads the prompt from standard input and prints a continuation",
          "[cli][generate]") {
  const std::string model = q(fixture("gqa_llama3/model"));
  const auto a = run_lorafit("generate --device cpu --model " + model +
                             " --prompt 'The cat' --max-new-tokens 5");
  const auto b = run_lorafit(
      "generate --device cpu --model " + model + " --prompt - --max-new-tokens 5", "The cat");
  INFO(a.err);
  REQUIRE(a.code == 0);
  REQUIRE(a.out == b.out);
  REQUIRE(!a.out.empty());
}

TEST_CASE("generate --temperature 0 prints transformers' greedy text", "[cli][generate]") {
  const auto expected = lorafit::test::read_json(fixture("trained_tiny/expected.json"));
  for (const auto& case_ : expected["greedy"]) {
    const auto r =
        run_lorafit("generate --device cpu --temperature 0 --max-new-tokens 12 --model " +
                    q(fixture("trained_tiny/model")) + " --prompt " + q(case_["prompt"]));
    REQUIRE(r.code == 0);
    REQUIRE(r.out == case_["text"].get<std::string>() + "\n");
  }
}

TEST_CASE("eval --format chat scores only the responses and reports exact matches", "[cli][eval]") {
  TempDir tmp;
  const std::string chat = tmp / "chat.jsonl";
  lorafit::test::write_text(
      chat,
      R"({"messages": [{"role": "user", "content": "The cat"}, {"role": "assistant", "content": "sat on the mat."}]})"
      "\n"
      R"({"messages": [{"role": "user", "content": "The dog"}, {"role": "assistant", "content": "ran far away."}]})"
      "\n");
  const auto r = run_lorafit("eval --device cpu --json --format chat --model " +
                             q(fixture("trained_tiny/model")) + " --data " + q(chat));
  INFO(r.err);
  REQUIRE(r.code == 0);
  const auto j = nlohmann::json::parse(r.out);
  REQUIRE(j["records"] == 2);
  REQUIRE(j["accuracy"].get<double>() >= 0.0);
  REQUIRE(j["accuracy"].get<double>() <= 1.0);
  // The default format is text, which a chat record is not.
  const auto text = run_lorafit("eval --device cpu --json --model " +
                                q(fixture("trained_tiny/model")) + " --data " + q(chat));
  REQUIRE(text.code == 2);  // a chat record has no "text"
  const auto bad = run_lorafit("eval --device cpu --format yaml --model " +
                               q(fixture("trained_tiny/model")) + " --data " + q(chat));
  REQUIRE(bad.code == 2);
}

TEST_CASE("tokenize shows a folder's ids and tokens from its tokenizer files alone",
          "[cli][tokenize]") {
  const auto dir = lorafit::test::fixture("tokenizers/llama3_1");  // no config.json, no weights
  const auto expected = lorafit::test::read_json(dir + "/expected.json");
  std::string input;
  for (const auto& r : expected) input += nlohmann::json{{"text", r["text"]}}.dump() + "\n";
  for (const bool special : {true, false}) {
    const auto r = lorafit::test::run_lorafit(
        "tokenize --json --model " + lorafit::test::quote(dir) + (special ? "" : " --no-special"),
        input);
    INFO(r.err);
    REQUIRE(r.code == 0);
    std::istringstream lines(r.out);
    size_t i = 0;
    for (std::string line; std::getline(lines, line); ++i) {
      const auto j = nlohmann::json::parse(line);
      REQUIRE(j["ids"] == expected[i][special ? "ids_special" : "ids"]);
      REQUIRE(j["text"] == expected[i]["text"]);
      REQUIRE(j["tokens"].size() == j["ids"].size());
    }
    REQUIRE(i == expected.size());
  }
  const auto view = lorafit::test::run_lorafit("tokenize --model " + lorafit::test::quote(dir),
                                               "{\"text\": \"Hello world\"}\n");
  REQUIRE(view.code == 0);
  REQUIRE_THAT(view.out, Catch::Contains("128000:\"<|begin_of_text|>\"") &&
                             Catch::Contains("1917:\"Ġworld\"") && Catch::Contains("(3 tokens)"));
}

TEST_CASE("tokenize --format chat shows the rendering and which tokens train", "[cli][tokenize]") {
  const auto dir = lorafit::test::fixture("tokenizers/llama3_1");
  const std::string record =
      R"({"messages": [{"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "Hello world"}]})";
  const auto r = run_lorafit("tokenize --json --format chat --model " + q(dir), record + "\n");
  INFO(r.err);
  REQUIRE(r.code == 0);
  const auto j = nlohmann::json::parse(r.out);
  REQUIRE(
      j["text"].get<std::string>().find("<|start_header_id|>assistant<|end_header_id|>\n\nHello "
                                        "world<|eot_id|>") != std::string::npos);
  REQUIRE(j["labels_mask"].size() == j["ids"].size());
  std::vector<std::string> trained;
  for (size_t k = 0; k < j["ids"].size(); ++k)
    if (j["labels_mask"][k] == 1) trained.push_back(j["tokens"][k]);
  REQUIRE(trained == std::vector<std::string>{"Hello", "Ġworld", "<|eot_id|>"});
  // The generation prompt ends the rendering; a record's kwargs reach the template.
  const auto gen = run_lorafit(
      "tokenize --format chat --add-generation-prompt --chat-template-kwargs "
      "'{\"enable_thinking\": false}' --model " +
          q(lorafit::test::fixture("tokenizers/qwen3")),
      R"({"messages": [{"role": "user", "content": "Hello world"}]})"
      "\n");
  INFO(gen.err);
  REQUIRE(gen.code == 0);
  REQUIRE_THAT(gen.out, Catch::Contains("<|im_start|>assistant\n<think>\n\n</think>\n\n") &&
                            Catch::Contains("0 trained, marked *"));
}

TEST_CASE("broken tokenizer and chat inputs exit 2 naming the file and the problem",
          "[cli][tokenize]") {
  TempDir tmp;
  const std::string hello = R"({"text": "Hello world"})";
  const std::string chat =
      R"({"messages": [{"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "Hello world"}]})";
  // A copy of a real tokenizer folder with one file edited.
  auto folder = [&](const std::string& name, const std::string& from,
                    const std::function<void(const std::string&)>& edit) {
    const auto dir = lorafit::test::copy_fixture("tokenizers/" + from, tmp / name);
    edit(dir);
    return dir;
  };
  auto edit_json = [](const std::string& path, const std::function<void(nlohmann::json&)>& f) {
    auto j = lorafit::test::read_json(path);
    f(j);
    lorafit::test::write_text(path, j.dump());
  };
  auto tokenize = [&](const std::string& dir, const std::string& input, const std::string& extra,
                      const std::string& fragment) {
    const auto r = run_lorafit("tokenize " + extra + " --model " + q(dir), input + "\n");
    INFO(input << "\n" << r.err);
    REQUIRE(r.code == 2);
    REQUIRE(r.err.rfind("lorafit: error: ", 0) == 0);
    REQUIRE_THAT(r.err, Catch::Contains(fragment));
  };
  const std::string as_chat = "--format chat";

  auto d = folder("truncated", "llama3_1", [](const std::string& dir) {
    const auto text = lorafit::test::read_text(dir + "/tokenizer.json");
    lorafit::test::write_text(dir + "/tokenizer.json", text.substr(0, text.size() / 2));
  });
  tokenize(d, hello, "", "truncated/tokenizer.json");
  d = folder("merge", "llama3_1", [&](const std::string& dir) {
    edit_json(dir + "/tokenizer.json", [](auto& j) { j["model"]["merges"].push_back("zzq qqz"); });
  });
  tokenize(d, hello, "", "merge");
  d = folder("vocab", "qwen3", [&](const std::string& dir) {
    edit_json(dir + "/tokenizer.json", [](auto& j) { j["model"]["vocab"] = "not a map"; });
  });
  tokenize(d, hello, "", "vocab/tokenizer.json");
  d = folder("noconfig", "qwen3", [](const std::string& dir) {
    lorafit::test::write_text(dir + "/tokenizer_config.json", "{\"chat_template\": ");
  });
  tokenize(d, chat, as_chat, "noconfig/tokenizer_config.json' is not");
  d = folder("syntax", "qwen3", [&](const std::string& dir) {
    edit_json(dir + "/tokenizer_config.json",
              [](auto& j) { j["chat_template"] = "{% for m in messages %}{{ m.content }"; });
  });
  tokenize(d, chat, as_chat, "line 1: syntax error");
  d = folder("number", "qwen3", [&](const std::string& dir) {
    edit_json(dir + "/tokenizer_config.json", [](auto& j) { j["chat_template"] = 7; });
  });
  tokenize(d, chat, as_chat, "chat_template of");
  d = folder("unsupported", "qwen3", [&](const std::string& dir) {
    edit_json(dir + "/tokenizer_config.json",
              [](auto& j) { j["chat_template"] = "{% include 'other.jinja' %}"; });
  });
  tokenize(d, chat, as_chat, "{% include %} statement is not supported");
  const auto qwen = lorafit::test::fixture("tokenizers/qwen3");
  const auto jinja = lorafit::test::read_json(lorafit::test::fixture("jinja/cases.json"));
  lorafit::test::write_text(tmp / "nemo.jinja", jinja["templates"]["mistral_nemo"]);
  tokenize(qwen,
           R"({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})",
           as_chat + " --chat-template " + q(tmp / "nemo.jinja"),
           "conversation roles must alternate user/assistant");
  lorafit::test::write_text(
      tmp / "roles.jinja",
      "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}"
      "{{ raise_exception('unknown role ' + m.role) }}{% endif %}{% endfor %}");
  tokenize(qwen, R"({"messages": [{"role": "narrator", "content": "hi"}]})",
           as_chat + " --chat-template " + q(tmp / "roles.jinja"), "unknown role narrator");
  tokenize(qwen, chat, as_chat + " --chat-template " + q(tmp / "missing.jinja"),
           "cannot read chat template");
  tokenize(qwen, R"({"text": "no messages"})", as_chat,
           "<stdin>:1: expected a non-empty \"messages\"");
  tokenize(qwen, R"({"messages": [{"content": "no role"}]})", as_chat, "needs a \"role\" string");
  tokenize(qwen, R"({"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": 3})",
           as_chat, "\"chat_template_kwargs\" must be an object");
  tokenize(qwen, chat, as_chat + " --chat-template-kwargs '[1'",
           "--chat-template-kwargs is not JSON");
  tokenize(lorafit::test::fixture("gqa_llama3/model"), chat,
           as_chat + " --chat-template " + q(tmp / "roles.jinja"),
           "needs the model's tokenizer.json");
  tokenize(lorafit::test::fixture("gqa_llama3/model"),
           R"({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]})",
           as_chat, "the llama2 chat format");
}

TEST_CASE("eval --packing gives eval's loss, tokens and exact matches", "[cli][eval][packing]") {
  TempDir tmp;
  // Mixed-length alpaca records, and stories cut to 64 tokens (they are longer).
  std::string alpaca;
  for (int i = 0; i < 7; ++i) {
    alpaca += nlohmann::json{{"instruction", "Repeat " + std::string(3 * i + 1, 'a') + "."},
                             {"input", i % 2 ? "twice" : ""},
                             {"output", std::string(5 * i + 2, 'b')}}
                  .dump() +
              "\n";
  }
  lorafit::test::write_text(tmp / "alpaca.jsonl", alpaca);
  // Stories longer than the 64 tokens they are cut to, and short lines that share rows.
  std::string text = lorafit::test::read_text("recipes/data/stories_valid.jsonl");
  for (const char* line : {"Zib ran.", "Ben had a ball.", "The sun was hot.", "Beep beep!"})
    text += nlohmann::json{{"text", line}}.dump() + "\n";
  lorafit::test::write_text(tmp / "text.jsonl", text);
  for (const auto& [model, args] :
       {std::pair{fixture("gqa_llama3/model"), "--format alpaca --data " + q(tmp / "alpaca.jsonl")},
        {lorafit::test::stories260k(), "--max-seq-len 64 --data " + q(tmp / "text.jsonl")}}) {
    INFO(args);
    const auto plain = eval_json("--batch-size 3 --model " + q(model) + " " + args);
    const auto packed = eval_json("--batch-size 3 --packing --model " + q(model) + " " + args);
    REQUIRE(plain["tokens"].get<int64_t>() > 100);
    REQUIRE(packed["loss"].get<double>() == Approx(plain["loss"].get<double>()).epsilon(1e-5));
    REQUIRE(packed["tokens"] == plain["tokens"]);
    REQUIRE(packed["records"] == plain["records"]);
    REQUIRE(packed["accuracy"] == plain["accuracy"]);
  }
}
