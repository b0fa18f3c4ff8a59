#include <catch2/catch.hpp>

#include "core/errors.h"
#include "core/safetensors.h"
#include "test_util.h"

using namespace lorafit;
namespace fs = std::filesystem;
using lorafit::test::TempDir;

namespace {

TensorMap sample_tensors() {
  torch::manual_seed(3);
  return {
      {"a.f32", torch::randn({3, 5})},
      {"b.bf16", torch::randn({4}).to(torch::kBFloat16)},
      {"c.f16", torch::randn({2, 2, 2}).to(torch::kFloat16)},
      {"d.i64", torch::arange(7, torch::kInt64)},
      {"e.scalar", torch::tensor(2.5)},
      {"f.empty", torch::empty({0, 3})},
  };
}

void require_same(const TensorMap& expected,
                  const std::function<torch::Tensor(const std::string&)>& get) {
  for (const auto& [name, t] : expected) {
    auto got = get(name);
    INFO(name);
    REQUIRE(got.scalar_type() == t.scalar_type());
    REQUIRE(got.sizes() == t.sizes());
    REQUIRE(torch::equal(got, t));
  }
}

// A valid file's bytes, to be broken by each case below.
std::string valid_file_bytes(const TempDir& tmp) {
  save_safetensors(tmp / "ok.safetensors", {{"w", torch::ones({2, 3})}, {"v", torch::ones({4})}});
  return lorafit::test::read_text(tmp / "ok.safetensors");
}

std::string with_header(const std::string& json, size_t data_bytes) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((json.size() >> (8 * i)) & 0xff);
  return out + json + std::string(data_bytes, '\0');
}

}  // namespace

TEST_CASE("safetensors round-trips every dtype bit for bit", "[core][safetensors]") {
  TempDir tmp;
  const auto tensors = sample_tensors();
  save_safetensors(tmp / "x.safetensors", tensors);
  SafetensorsFile file(tmp / "x.safetensors");
  REQUIRE(file.header().metadata.at("format") == "pt");
  REQUIRE(file.header().data_start % 8 == 0);
  require_same(tensors, [&](const std::string& n) { return file.tensor(n); });
}

TEST_CASE("sharded safetensors with an index round-trip", "[core][safetensors]") {
  TempDir tmp;
  const auto tensors = sample_tensors();
  save_safetensors_sharded(tmp.path.string(), tensors, /*max_shard_bytes=*/40);
  REQUIRE(fs::exists(tmp / "model.safetensors.index.json"));
  const auto index = lorafit::test::read_json(tmp / "model.safetensors.index.json");
  REQUIRE(index["weight_map"].size() == tensors.size());
  REQUIRE(index["metadata"]["total_size"].get<int64_t>() == 15 * 4 + 4 * 2 + 8 * 2 + 7 * 8 + 4);
  SafetensorsCheckpoint ckpt(tmp.path.string());
  require_same(tensors, [&](const std::string& n) { return ckpt.tensor(n); });
  REQUIRE(ckpt.data_bytes() == index["metadata"]["total_size"].get<uint64_t>());
}

TEST_CASE("one shard is written as model.safetensors without an index", "[core][safetensors]") {
  TempDir tmp;
  save_safetensors_sharded(tmp.path.string(), sample_tensors(), /*max_shard_bytes=*/1 << 20);
  REQUIRE(fs::exists(tmp / "model.safetensors"));
  REQUIRE_FALSE(fs::exists(tmp / "model.safetensors.index.json"));
}

TEST_CASE("the fixtures' transformers-written shards are read through their index",
          "[core][safetensors]") {
  SafetensorsCheckpoint ckpt(lorafit::test::fixture("mha_linear/model"));
  const auto index = lorafit::test::read_json(
      lorafit::test::fixture("mha_linear/model/model.safetensors.index.json"));
  REQUIRE(ckpt.entries().size() == index["weight_map"].size());
  REQUIRE(ckpt.tensor("model.norm.weight").scalar_type() == torch::kBFloat16);
}

TEST_CASE("broken safetensors files are refused with the file named", "[core][safetensors]") {
  TempDir tmp;
  const std::string good = valid_file_bytes(tmp);
  const std::string path = tmp / "bad.safetensors";
  auto expect_error = [&](const std::string& bytes, const std::string& fragment) {
    lorafit::test::write_text(path, bytes);
    INFO(fragment);
    REQUIRE_THROWS_WITH(SafetensorsFile(path), Catch::Contains(path) && Catch::Contains(fragment));
  };
  SECTION("empty file") {
    expect_error("", "shorter than the 8-byte header length");
  }
  SECTION("truncated data") {
    expect_error(good.substr(0, good.size() - 5), "outside the data buffer");
  }
  SECTION("truncated header") {
    expect_error(good.substr(0, 20), "declares a header of");
  }
  SECTION("header length beyond the limit") {
    std::string bytes = good;
    bytes[7] = 0x7f;
    expect_error(bytes, "more than the limit");
  }
  SECTION("not JSON") {
    expect_error(with_header("{nope", 0), "not valid JSON");
  }
  SECTION("not an object") {
    expect_error(with_header("[1,2]   ", 0), "not a JSON object");
  }
  SECTION("unknown dtype") {
    expect_error(with_header(R"({"w":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}})", 2),
                 "dtype 'F8_E4M3'");
  }
  SECTION("size does not match the shape") {
    expect_error(with_header(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8),
                 "does not match its shape");
  }
  SECTION("overlapping tensors") {
    expect_error(with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                             12),
                 "overlapping tensors");
  }
  SECTION("offsets past the end") {
    expect_error(with_header(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8),
                 "outside the data buffer");
  }
  SECTION("negative shape") {
    expect_error(with_header(R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4),
                 "not a non-negative integer");
  }
  SECTION("shape product overflows") {
    expect_error(with_header(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296,16],)"
                             R"("data_offsets":[0,4]}})",
                             4),
                 "does not match its shape");
  }
  SECTION("metadata value not a string") {
    expect_error(with_header(R"({"__metadata__":{"format":1}})", 0), "not a string");
  }
}

TEST_CASE("a checkpoint index naming a missing shard is refused", "[core][safetensors]") {
  TempDir tmp;
  save_safetensors_sharded(tmp.path.string(), sample_tensors(), /*max_shard_bytes=*/40);
  fs::remove(tmp / "model-00002-of-00004.safetensors");
  REQUIRE_THROWS_WITH(
      SafetensorsCheckpoint(tmp.path.string()),
      Catch::Contains("model-00002-of-00004.safetensors") && Catch::Contains("missing"));
}

TEST_CASE("a folder with no safetensors is refused", "[core][safetensors]") {
  TempDir tmp;
  REQUIRE_THROWS_AS(SafetensorsCheckpoint(tmp.path.string()), IoError);
}

TEST_CASE("writes leave no temporary file behind", "[core][safetensors]") {
  TempDir tmp;
  save_safetensors(tmp / "a.safetensors", sample_tensors());
  int files = 0;
  for (const auto& e : fs::directory_iterator(tmp.path)) {
    (void)e;
    ++files;
  }
  REQUIRE(files == 1);
}
