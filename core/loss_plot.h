// The loss curve that a run draws as OUTPUT/loss.svg, with no plotting library.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace lorafit {

struct LossHistory {
  std::vector<std::pair<int64_t, double>> train;  // (step, loss)
  std::vector<std::pair<int64_t, double>> valid;  // (step, eval_loss)
};

/// The losses recorded in a metrics.jsonl (empty if the file does not exist).
LossHistory read_loss_history(const std::string& metrics_path);

/// An SVG line chart: training loss and validation loss against the step.
std::string loss_svg(const LossHistory& history);

}  // namespace lorafit
