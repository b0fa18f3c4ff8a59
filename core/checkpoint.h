// Resumable checkpoints, OUTPUT/checkpoints/step-N/: the adapter (or the model), the
// optimizer, the CPU RNG, where the data stream stands, and the job's resolved recipe, each
// written whole or not at all.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>

#include "core/datasets.h"
#include "core/optimizer.h"
#include "core/recipe.h"

namespace lorafit {

/// What a checkpoint holds besides the adapter and the optimizer.
struct TrainerState {
  int64_t step = 0;
  DataPosition data;
};

/// Writes the checkpoint folder `dir` (`save_model_to` fills in the adapter or model files
/// of the folder it is given), then removes all but the newest `keep` checkpoints beside it
/// (0 keeps all).
void write_checkpoint(const std::filesystem::path& dir,
                      const TrainerState& state,
                      const AdamW& optimizer,
                      const std::string& recipe_yaml,
                      const std::function<void(const std::string&)>& save_model_to,
                      int64_t keep);

/// The newest checkpoint at `resume` (a checkpoint, or an output with checkpoints/step-N/),
/// or an empty path when there is none.
std::filesystem::path find_checkpoint(const std::filesystem::path& resume);

/// A checkpoint's trainer_state.json; an IoError that names the file, and the checkpoint
/// before it, when it is missing or damaged.
TrainerState read_trainer_state(const std::filesystem::path& checkpoint);

/// The resolved recipe that the checkpoint's run trained with: the checkpoint's own
/// recipe.yaml, else (older checkpoints) the run's OUTPUT/recipe.yaml; none if neither exists.
std::optional<Recipe> checkpoint_recipe(const std::filesystem::path& checkpoint);

}  // namespace lorafit
