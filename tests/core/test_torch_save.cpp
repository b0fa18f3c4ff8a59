#include <catch2/catch.hpp>

#include "core/errors.h"
#include "core/safetensors.h"
#include "core/torch_save_format.h"
#include "test_util.h"

using namespace lorafit;
using lorafit::test::TempDir;

namespace {

// Pickle pieces as torch.save writes them (protocol 2), for files the writer does not make.
std::string str(const std::string& s) {
  std::string p = "X";
  for (int i = 0; i < 4; ++i) p.push_back(static_cast<char>(s.size() >> (8 * i) & 0xFF));
  return p + s;
}
std::string num(int64_t v) {
  std::string p = "J";
  for (int i = 0; i < 4; ++i) p.push_back(static_cast<char>(v >> (8 * i) & 0xFF));
  return p;
}
std::string ints(const std::vector<int64_t>& v) {
  std::string p = "(";
  for (const auto x : v) p += num(x);
  return p + "t";
}
// _rebuild_tensor_v2 of float storage `key` (of `numel` elements) viewed with size and stride.
std::string tensor(const std::string& key,
                   int64_t numel,
                   int64_t offset,
                   const std::vector<int64_t>& size,
                   const std::vector<int64_t>& stride) {
  return "ctorch._utils\n_rebuild_tensor_v2\n((" + str("storage") + "ctorch\nFloatStorage\n" +
         str(key) + str("cpu") + num(numel) + "tQ" + num(offset) + ints(size) + ints(stride) +
         "\x89"
         "ccollections\nOrderedDict\n)RtR";
}
std::string floats(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
}

std::string parse_error(const std::string& bytes) {
  try {
    parse_torch_save(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "x.bin");
  } catch (const IoError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("tensors written as torch.save writes them read back equal", "[unit][torch_save]") {
  TempDir tmp;
  torch::manual_seed(5);
  const TensorMap tensors = {
      {"a.f32", torch::randn({3, 5})},
      {"b.bf16", torch::randn({4}).to(torch::kBFloat16)},
      {"c.f16", torch::randn({2, 2, 2}).to(torch::kFloat16)},
      {"d.f64", torch::randn({3}, torch::kFloat64)},
      {"e.i64", torch::arange(300, torch::kInt64)},
      {"f.bool", torch::rand({5}) > 0.5},
      {"g.scalar", torch::tensor(2.5)},
      {"h.empty", torch::empty({0, 3})},
      {"i.view", torch::randn({4, 6}).t()},  // not contiguous: written as its values
  };
  save_torch_bin(tmp / "t.bin", tensors);
  const auto back = load_torch_bin(tmp / "t.bin");
  REQUIRE(back.size() == tensors.size());
  for (const auto& [name, t] : tensors) {
    INFO(name);
    REQUIRE(back.at(name).scalar_type() == t.scalar_type());
    REQUIRE(back.at(name).sizes() == t.sizes());
    REQUIRE(torch::equal(back.at(name), t));
  }
  // Every entry's data starts 64-byte aligned, as torch.save lays it out for mmap.
  const auto bytes = lorafit::test::read_text(tmp / "t.bin");
  const auto archive =
      parse_torch_save(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "t.bin");
  for (const auto& [key, s] : archive.storages) REQUIRE(s.offset % 64 == 0);
}

TEST_CASE("a torch.save pickle's views, shared storages, nested dicts and memo are read",
          "[unit][torch_save]") {
  // One storage of 12 floats seen as a [3, 4] matrix, its transpose, and a strided column, in
  // a memoized OrderedDict holding a nested dict; one tensor is an nn.Parameter.
  const std::vector<float> values = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
  const std::string pickle =
      "\x80\x02"
      "ccollections\nOrderedDict\n)Rq\x05(" +
      str("m") + tensor("0", 12, 0, {3, 4}, {4, 1}) + str("inner") + "}q\x01(" + str("t") +
      tensor("0", 12, 0, {4, 3}, {1, 4}) + str("col") + "ctorch._utils\n_rebuild_parameter\n(" +
      tensor("0", 12, 1, {3}, {4}) +
      "\x88"
      "ccollections\nOrderedDict\n)RtR" +
      "uu.";
  const auto bytes = torch_save_archive(pickle, {{"0", floats(values)}});
  TempDir tmp;
  lorafit::test::write_text(tmp / "v.bin", bytes);
  const auto got = load_torch_bin(tmp / "v.bin");
  const auto m = torch::arange(12, torch::kFloat32).reshape({3, 4});
  REQUIRE(got.size() == 3);
  REQUIRE(torch::equal(got.at("m"), m));
  REQUIRE(torch::equal(got.at("inner.t"), m.t()));
  REQUIRE(torch::equal(got.at("inner.col"), m.select(1, 1)));
}

TEST_CASE("hostile or broken torch.save files are refused with the problem named",
          "[unit][torch_save]") {
  const std::string ok_pickle = "\x80\x02}(" + str("w") + tensor("0", 4, 0, {2, 2}, {2, 1}) + "u.";
  const auto ok_storage = floats({1, 2, 3, 4});
  const auto ok = torch_save_archive(ok_pickle, {{"0", ok_storage}});
  REQUIRE(parse_error(ok).empty());

  SECTION("a global other than the tensor rebuild functions is refused before any call") {
    for (const std::string& global : {"cos\nsystem\n", "cposix\nsystem\n", "cbuiltins\neval\n",
                                      "ctorch\nload\n", "c__builtin__\ngetattr\n"}) {
      INFO(global);
      const auto evil = "\x80\x02" + global + "(" + str("echo hi") + "tR.";
      const auto msg = parse_error(torch_save_archive(evil, {}));
      REQUIRE_THAT(msg, Catch::Contains("which is not a tensor") && Catch::Contains("refused"));
    }
    // The same through protocol 4's STACK_GLOBAL.
    const auto msg = parse_error(
        torch_save_archive("\x80\x04\x8c\x02os\x8c\x06system\x93" + str("id") + "\x85R.", {}));
    REQUIRE_THAT(msg, Catch::Contains("'os.system'"));
  }
  SECTION("an allowed global called in a way torch.save never calls it") {
    const auto msg = parse_error(torch_save_archive(
        "\x80\x02}(" + str("w") + "ccollections\nOrderedDict\n(" + num(1) + "tRu.", {}));
    REQUIRE_THAT(msg, Catch::Contains("OrderedDict is built with arguments"));
  }
  SECTION("a truncated file, cut anywhere") {
    for (size_t cut = 0; cut < ok.size(); cut += 7) {
      INFO(cut);
      REQUIRE_FALSE(parse_error(ok.substr(0, cut)).empty());
    }
  }
  SECTION("a tensor whose view reaches past its storage") {
    for (const auto& t : {tensor("0", 4, 1, {2, 2}, {2, 1}), tensor("0", 4, 0, {2, 3}, {3, 1}),
                          tensor("0", 4, 0, {2, 2}, {4, 1})}) {
      const auto msg =
          parse_error(torch_save_archive("\x80\x02}(" + str("w") + t + "u.", {{"0", ok_storage}}));
      REQUIRE_THAT(msg, Catch::Contains("tensor 'w' reaches past the end of its storage '0'"));
    }
  }
  SECTION("a storage that holds fewer bytes than its numel, or is missing") {
    auto msg = parse_error(torch_save_archive(ok_pickle, {{"0", floats({1, 2, 3})}}));
    REQUIRE_THAT(msg, Catch::Contains("storage '0' holds 12 bytes, not 4 elements of F32"));
    msg = parse_error(torch_save_archive(ok_pickle, {}));
    REQUIRE_THAT(msg, Catch::Contains("names storage '0', which is not in the file"));
  }
  SECTION("damaged bytes fail the CRC") {
    auto bad = ok;
    bad[bad.find(ok_storage) + 2] ^= 0x10;
    REQUIRE_THAT(parse_error(bad), Catch::Contains("fails its CRC"));
  }
  SECTION("values that are not tensors, and pickles that are not torch.save's") {
    REQUIRE_THAT(parse_error(torch_save_archive("\x80\x02}(" + str("epoch") + num(3) + "u.", {})),
                 Catch::Contains("'epoch' is not a tensor"));
    REQUIRE_THAT(parse_error(torch_save_archive("\x80\x02]"
                                                ".",
                                                {})),
                 Catch::Contains("no dict of tensors"));
    REQUIRE_THAT(parse_error(torch_save_archive("\x80\x02}(h\x07u.", {})),
                 Catch::Contains("memo entry it never wrote"));
    REQUIRE_THAT(parse_error("\x80\x02\x8a\x0al\xfc\x9c"
                             "F\xf9 j\xa8P\x19."),
                 Catch::Contains("legacy format"));
    REQUIRE_THAT(parse_error("PK\x03\x04 this is not really a zip archive"),
                 Catch::Contains("no end-of-archive"));
  }
}
