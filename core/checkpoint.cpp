#include "core/checkpoint.h"

#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/compat.h"
#include "core/errors.h"
#include "core/run_dir.h"
#include "core/safetensors.h"

namespace lorafit {

namespace {

namespace fs = std::filesystem;

// The complete checkpoints of a checkpoints/ folder by step (temporary folders excluded).
std::map<int64_t, fs::path> checkpoints_by_step(const fs::path& folder) {
  std::map<int64_t, fs::path> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(folder, ec)) {
    const auto name = e.path().filename().string();
    if (name.rfind("step-", 0) != 0) continue;
    const auto digits = name.substr(5);  // "4.tmp-123" is not digits: a temporary folder
    if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos) continue;
    if (!fs::exists(e.path() / "trainer_state.json")) continue;
    out[std::stoll(digits)] = e.path();
  }
  return out;
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

void write_checkpoint(const fs::path& dir,
                      const TrainerState& state,
                      const AdamW& optimizer,
                      const std::string& recipe_yaml,
                      const std::function<void(const std::string&)>& save_model_to,
                      int64_t keep) {
  write_folder_atomic(dir, [&](const std::string& tmp) {
    const fs::path t(tmp);
    save_model_to(tmp);
    optimizer.save((t / "optimizer.safetensors").string());
    torch::save(compat::cpu_rng_state(), (t / "rng.pt").string());
    write_file_atomic((t / "recipe.yaml").string(), recipe_yaml);
    const nlohmann::json j = {
        {"step", state.step}, {"epoch", state.data.epoch}, {"cursor", state.data.cursor}};
    write_file_atomic((t / "trainer_state.json").string(), j.dump(2) + "\n");
  });
  if (keep <= 0) return;
  auto all = checkpoints_by_step(dir.parent_path());
  while (static_cast<int64_t>(all.size()) > keep) {
    remove_tree(all.begin()->second);
    all.erase(all.begin());
  }
}

fs::path find_checkpoint(const fs::path& resume) {
  if (fs::exists(resume / "trainer_state.json")) return resume;
  const auto all = checkpoints_by_step(resume / "checkpoints");
  return all.empty() ? fs::path() : all.rbegin()->second;
}

TrainerState read_trainer_state(const fs::path& checkpoint) {
  const auto path = checkpoint / "trainer_state.json";
  const auto j = nlohmann::json::parse(read_file(path), nullptr, /*allow_exceptions=*/false);
  const auto count = [&](const char* key) {
    return j.is_object() && j.contains(key) && j[key].is_number_integer() && j[key] >= 0;
  };
  if (!count("step") || !count("epoch") || !count("cursor")) {
    std::string hint = "resume from an earlier checkpoint";
    const auto all = checkpoints_by_step(checkpoint.parent_path());
    for (auto it = all.rbegin(); it != all.rend(); ++it) {
      if (it->second != checkpoint) {
        hint = "resume from an earlier checkpoint, e.g. --resume " + it->second.string();
        break;
      }
    }
    throw IoError("checkpoint file '" + path.string() +
                  "' is damaged or incomplete: expected {\"step\", \"epoch\", \"cursor\"} "
                  "as whole numbers (hint: " +
                  hint + ")");
  }
  return {j["step"].get<int64_t>(), {j["epoch"].get<int64_t>(), j["cursor"].get<int64_t>()}};
}

std::optional<Recipe> checkpoint_recipe(const fs::path& checkpoint) {
  auto path = checkpoint / "recipe.yaml";
  // checkpoints/step-N/ of an output: OUTPUT/recipe.yaml, for checkpoints written before
  // they held their own.
  if (!fs::exists(path) && checkpoint.parent_path().filename() == "checkpoints")
    path = checkpoint.parent_path().parent_path() / "recipe.yaml";
  if (!fs::exists(path)) return std::nullopt;
  return parse_recipe_text(read_file(path), path.string());
}

}  // namespace lorafit
