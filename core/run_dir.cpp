#include "core/run_dir.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

#include "core/errors.h"

namespace lorafit {

namespace {

namespace fs = std::filesystem;

// The pid of a NAME.tmp-PID entry, or 0 when the name is not one.
pid_t temp_owner(const std::string& name) {
  const auto at = name.rfind(".tmp-");
  if (at == std::string::npos || at + 5 == name.size()) return 0;
  const auto digits = name.substr(at + 5);
  if (digits.size() > 9 || digits.find_first_not_of("0123456789") != std::string::npos) return 0;
  return static_cast<pid_t>(std::stol(digits));
}

bool process_alive(pid_t pid) {
  return pid == ::getpid() || ::kill(pid, 0) == 0 || errno == EPERM;
}

// What the folder holds besides the lock file: a few names, for the message.
std::vector<std::string> contents(const fs::path& dir) {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const auto name = e.path().filename().string();
    if (name != kLockFile) names.push_back(name);
  }
  return names;
}

std::string listing(std::vector<std::string> names) {
  std::sort(names.begin(), names.end());
  std::string out;
  for (size_t i = 0; i < names.size() && i < 4; ++i) out += (i ? ", " : "") + names[i];
  if (names.size() > 4) out += ", ...";
  return out;
}

IoError holds_a_run(const std::string& key,
                    const std::string& dir,
                    std::vector<std::string> names) {
  return IoError(key + " '" + dir + "' holds another run (" + listing(std::move(names)) +
                 ") (hint: --resume " + dir + " continues it, --overwrite replaces it, or choose " +
                 "a new output folder)");
}

IoError in_use(const std::string& key, const std::string& dir, int fd) {
  char buf[32] = {};
  const auto n = ::pread(fd, buf, sizeof(buf) - 1, 0);
  std::string pid = n > 0 ? std::string(buf, static_cast<size_t>(n)) : "";
  while (!pid.empty() && (pid.back() == '\n' || pid.back() == ' ')) pid.pop_back();
  return IoError(key + " '" + dir + "' is in use by another lorafit run" +
                 (pid.empty() ? "" : " (pid " + pid + ")") +
                 " (hint: wait for it to end, or choose another output folder)");
}

IoError not_writable(const std::string& key, const std::string& dir, const std::string& why) {
  return IoError(key + " '" + dir + "' cannot be written: " + why +
                 " (hint: choose a folder you can write to, or fix its permissions)");
}

// Throws if a live process holds the lock of `dir`.
void check_unlocked(const fs::path& dir, const std::string& key) {
  const int fd = ::open((dir / kLockFile).c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  const bool held = ::flock(fd, LOCK_SH | LOCK_NB) != 0;
  if (held) {
    const auto e = in_use(key, dir.string(), fd);
    ::close(fd);
    throw e;
  }
  ::close(fd);
}

// The lock file of `dir`, locked exclusively; throws naming the holder when another run has it.
int lock_folder(const fs::path& dir, const std::string& key) {
  const int fd = ::open((dir / kLockFile).c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) throw not_writable(key, dir.string(), std::strerror(errno));
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const auto e = in_use(key, dir.string(), fd);
    ::close(fd);
    throw e;
  }
  return fd;
}

void remove_stale(const fs::path& dir, int depth) {
  std::error_code ec;
  std::vector<fs::path> stale, below;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const pid_t owner = temp_owner(e.path().filename().string());
    if (owner > 0 && !process_alive(owner)) {
      stale.push_back(e.path());
    } else if (owner == 0 && depth > 0 && e.is_directory(ec) && !e.is_symlink(ec)) {
      below.push_back(e.path());
    }
  }
  for (const auto& p : stale) remove_tree(p);
  for (const auto& p : below) remove_stale(p, depth - 1);
}

}  // namespace

void remove_tree(const fs::path& path) {
  std::error_code ec;
  if (fs::is_directory(fs::symlink_status(path, ec))) {
    for (const auto& entry : fs::directory_iterator(path, ec)) remove_tree(entry.path());
  }
  fs::remove(path, ec);
}

void check_output(const std::string& dir, OutputMode mode, const std::string& key) {
  std::error_code ec;
  const fs::path p(dir);
  if (fs::exists(p, ec)) {
    if (!fs::is_directory(p, ec)) {
      throw IoError(key + " '" + dir +
                    "' is a file, not a folder (hint: name a folder for the run's outputs)");
    }
    check_unlocked(p, key);
    if (mode == OutputMode::Fresh) {
      auto names = contents(p);
      if (!names.empty()) throw holds_a_run(key, dir, std::move(names));
    }
    if (::access(p.c_str(), W_OK | X_OK) != 0) throw not_writable(key, dir, std::strerror(errno));
    return;
  }
  // A new folder: the nearest folder above it that exists must take it.
  fs::path above = fs::absolute(p, ec).parent_path();
  while (!above.empty() && !fs::exists(above, ec) && above != above.root_path())
    above = above.parent_path();
  if (fs::exists(above, ec) && !fs::is_directory(above, ec)) {
    throw IoError(key + " '" + dir + "' lies under '" + above.string() +
                  "', which is a file (hint: choose another output folder)");
  }
  if (::access(above.c_str(), W_OK | X_OK) != 0) {
    throw not_writable(key, dir, "'" + above.string() + "': " + std::strerror(errno));
  }
}

OutputLock::OutputLock(const std::string& dir, OutputMode mode, const std::string& key) {
  const fs::path p(dir);
  std::error_code ec;
  if (mode == OutputMode::Overwrite && fs::is_directory(p, ec) && !contents(p).empty()) {
    // Hold the old run's lock while it is moved aside in one rename: a reader sees the old
    // run or none, never a mix, and a live run is never moved.
    const int old = lock_folder(p, key);
    const auto aside = temp_path(p);
    remove_tree(aside);
    fs::rename(p, aside, ec);
    if (ec) {
      ::close(old);
      throw not_writable(key, dir, ec.message());
    }
    remove_tree(aside);
    ::close(old);
  }
  fs::create_directories(p, ec);
  if (ec || !fs::is_directory(p)) throw not_writable(key, dir, ec ? ec.message() : "not a folder");
  fd_ = lock_folder(p, key);
  if (mode == OutputMode::Fresh) {
    auto names = contents(p);
    if (!names.empty()) {
      ::close(fd_);
      fd_ = -1;
      throw holds_a_run(key, dir, std::move(names));
    }
  }
  const auto pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, pid.data(), pid.size(), 0) < 0) {
    ::close(fd_);
    fd_ = -1;
    throw not_writable(key, dir, std::strerror(errno));
  }
  remove_stale_temps(p);
}

OutputLock::~OutputLock() {
  if (fd_ >= 0) ::close(fd_);
}

OutputLock::OutputLock(OutputLock&& other) noexcept : fd_(other.fd_) {
  other.fd_ = -1;
}

fs::path temp_path(const fs::path& path) {
  return path.string() + ".tmp-" + std::to_string(::getpid());
}

void write_folder_atomic(const fs::path& dir,
                         const std::function<void(const std::string& tmp)>& fill) {
  const auto tmp = temp_path(dir);
  remove_tree(tmp);
  std::error_code ec;
  fs::create_directories(tmp, ec);
  if (ec) throw IoError("cannot create '" + tmp.string() + "': " + ec.message());
  try {
    fill(tmp.string());
  } catch (...) {
    remove_tree(tmp);
    throw;
  }
  // A folder cannot be renamed over a non-empty one: the old one steps aside first, under a
  // temporary name that a later run clears if this one dies in between.
  const auto old = temp_path(dir.string() + ".old");
  const bool replace = fs::exists(dir, ec);
  if (replace) fs::rename(dir, old, ec);
  if (!ec) fs::rename(tmp, dir, ec);
  if (ec) {
    remove_tree(tmp);
    throw IoError("cannot rename '" + tmp.string() + "' to '" + dir.string() +
                  "': " + ec.message());
  }
  if (replace) remove_tree(old);
}

void remove_stale_temps(const fs::path& dir) {
  remove_stale(dir, 2);
}

void remove_stale_siblings(const fs::path& path) {
  const auto parent = path.has_parent_path() ? path.parent_path() : fs::path(".");
  const auto prefix = path.filename().string() + ".tmp-";
  std::error_code ec;
  std::vector<fs::path> stale;
  for (const auto& e : fs::directory_iterator(parent, ec)) {
    const auto name = e.path().filename().string();
    const pid_t owner = temp_owner(name);
    if (name.rfind(prefix, 0) == 0 && owner > 0 && !process_alive(owner)) stale.push_back(e.path());
  }
  for (const auto& p : stale) remove_tree(p);
}

}  // namespace lorafit
