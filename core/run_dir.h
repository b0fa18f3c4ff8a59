// A run's output folder: one run at a time in it (an flock held for the whole run), never a
// new run mixed into an old one, the temporary folders of dead processes cleared away, and
// every folder written whole or not at all. No LibTorch here: it compiles fast and is used by
// train, merge and init alike.
#pragma once

#include <filesystem>
#include <functional>
#include <string>

namespace lorafit {

/// How a run may treat an output folder that holds something already.
enum class OutputMode {
  Fresh,      // the folder must be missing or empty
  Resume,     // the folder holds the run being resumed
  Overwrite,  // whatever the folder holds is replaced
};

/// The lock file inside every claimed output folder; it holds the pid of the claiming run.
inline constexpr const char* kLockFile = ".lorafit.lock";

/// Removes a file or a folder with everything in it. The pip LibTorch (2.x) exports its own
/// copy of std::filesystem::remove_all, which programs linked against it bind to and which
/// crashes on any non-empty folder; this walks the tree with the calls that work in both.
void remove_tree(const std::filesystem::path& path);

/// Checks, without writing anything, that `dir` can be this run's output: not a file, in a
/// place that can be written, not claimed by a live run, and (OutputMode::Fresh) holding no
/// other run. `key` names the setting in messages ("'output'"). Throws IoError.
void check_output(const std::string& dir, OutputMode mode, const std::string& key);

/// An exclusive claim to an output folder for the life of the object: created if missing, an
/// old run moved out of the way in one rename and deleted (OutputMode::Overwrite), the
/// temporary folders of dead processes removed, and an flock on DIR/.lorafit.lock that the
/// kernel drops when the process ends, however it ends.
class OutputLock {
 public:
  OutputLock(const std::string& dir, OutputMode mode, const std::string& key);
  ~OutputLock();
  OutputLock(OutputLock&& other) noexcept;
  OutputLock(const OutputLock&) = delete;
  OutputLock& operator=(const OutputLock&) = delete;
  OutputLock& operator=(OutputLock&&) = delete;

 private:
  int fd_ = -1;
};

/// The temporary name of `path` for this process: PATH.tmp-PID.
std::filesystem::path temp_path(const std::filesystem::path& path);

/// Writes the folder `dir` through `fill` (called with a fresh temporary folder beside it) and
/// renames it into place, replacing an older `dir`. If `fill` throws, `dir` is as it was and
/// the temporary folder is gone.
void write_folder_atomic(const std::filesystem::path& dir,
                         const std::function<void(const std::string& tmp)>& fill);

/// Removes every `NAME.tmp-PID` file or folder in `dir` and up to two levels below it whose
/// process has ended (what a killed run or a full disk left behind).
void remove_stale_temps(const std::filesystem::path& dir);

/// Removes the `NAME.tmp-PID` siblings of `path` (PATH.tmp-PID) whose process has ended.
void remove_stale_siblings(const std::filesystem::path& path);

}  // namespace lorafit
