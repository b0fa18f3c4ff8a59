#include <unistd.h>

#include <catch2/catch.hpp>

#include "core/errors.h"
#include "core/run_dir.h"
#include "test_util.h"

using namespace lorafit;
namespace fs = std::filesystem;
using lorafit::test::dead_pid;
using lorafit::test::read_text;
using lorafit::test::TempDir;
using lorafit::test::write_text;

TEST_CASE("an output folder is held by one claim at a time", "[core][run_dir]") {
  TempDir tmp;
  const auto dir = tmp / "run";
  {
    OutputLock first(dir, OutputMode::Fresh, "'output'");
    REQUIRE(read_text(dir + "/.lorafit.lock") == std::to_string(getpid()) + "\n");
    const auto held = "'output' '" + dir + "' is in use by another lorafit run (pid " +
                      std::to_string(getpid()) + ")";
    REQUIRE_THROWS_WITH(OutputLock(dir, OutputMode::Resume, "'output'"), Catch::Contains(held));
    REQUIRE_THROWS_WITH(check_output(dir, OutputMode::Overwrite, "'output'"),
                        Catch::Contains(held));
  }
  // Released with its holder; the lock file alone is no run.
  REQUIRE_NOTHROW(check_output(dir, OutputMode::Fresh, "'output'"));
  write_text(dir + "/metrics.jsonl", "{}\n");
  REQUIRE_THROWS_WITH(check_output(dir, OutputMode::Fresh, "'output'"),
                      Catch::Contains("holds another run (metrics.jsonl)"));
  REQUIRE_THROWS_AS(OutputLock(dir, OutputMode::Fresh, "'output'"), IoError);
  REQUIRE_NOTHROW(check_output(dir, OutputMode::Resume, "'output'"));
  {
    OutputLock replaced(dir, OutputMode::Overwrite, "'output'");
    REQUIRE_FALSE(fs::exists(dir + "/metrics.jsonl"));
  }
  REQUIRE(fs::directory_iterator(tmp.path) != fs::directory_iterator());
  for (const auto& e : fs::directory_iterator(tmp.path))
    REQUIRE(e.path().filename().string().find(".tmp-") == std::string::npos);
}

TEST_CASE("a folder written atomically is whole or as it was", "[core][run_dir]") {
  TempDir tmp;
  const fs::path dir = tmp / "adapter";
  write_folder_atomic(dir, [](const std::string& t) { write_text(t + "/a", "old"); });
  REQUIRE(read_text(dir / "a") == "old");
  REQUIRE_THROWS_AS(write_folder_atomic(dir,
                                        [](const std::string& t) {
                                          write_text(t + "/a", "half");
                                          throw IoError("disk full");
                                        }),
                    IoError);
  REQUIRE(read_text(dir / "a") == "old");
  write_folder_atomic(dir, [](const std::string& t) { write_text(t + "/b", "new"); });
  REQUIRE(read_text(dir / "b") == "new");
  REQUIRE_FALSE(fs::exists(dir / "a"));
  for (const auto& e : fs::directory_iterator(tmp.path)) REQUIRE(e.path().filename() == "adapter");
}

TEST_CASE("temporary files of dead processes are removed, a live one's kept", "[core][run_dir]") {
  TempDir tmp;
  const auto dead = std::to_string(dead_pid()), live = std::to_string(getpid());
  fs::create_directories(tmp / "checkpoints/step-4.tmp-" + dead);
  write_text(tmp / "checkpoints/step-4.tmp-" + dead + "/x", "half");
  write_text(tmp / "metrics.jsonl.tmp-" + dead, "half");
  write_text(tmp / "recipe.yaml.tmp-" + live, "mine");
  write_text(tmp / "notes.tmp-x", "not a temporary name");
  remove_stale_temps(tmp.path);
  REQUIRE_FALSE(fs::exists(tmp / "checkpoints/step-4.tmp-" + dead));
  REQUIRE_FALSE(fs::exists(tmp / "metrics.jsonl.tmp-" + dead));
  REQUIRE(fs::exists(tmp / "recipe.yaml.tmp-" + live));
  REQUIRE(fs::exists(tmp / "notes.tmp-x"));
  REQUIRE(fs::exists(tmp / "checkpoints"));

  fs::create_directories(tmp / ("merged.tmp-" + dead));
  remove_stale_siblings(tmp / "merged");
  REQUIRE_FALSE(fs::exists(tmp / ("merged.tmp-" + dead)));
}
