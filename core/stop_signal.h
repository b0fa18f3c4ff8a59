// SIGINT and SIGTERM during training: the first asks the run to stop once the step in
// progress is done (it then writes a checkpoint and says how to resume); a second one ends
// the process at once, as it would without lorafit's handler.
#pragma once

namespace lorafit {

/// Catches SIGINT and SIGTERM for its lifetime, then restores what was there before.
class StopSignals {
 public:
  StopSignals();
  ~StopSignals();
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

  /// The signal that asked to stop (SIGINT or SIGTERM), or 0.
  static int received();
};

}  // namespace lorafit
