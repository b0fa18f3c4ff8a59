#!/usr/bin/env bash
# Configures and builds lorafit and its tests in build/ (Release, Ninja, ccache when present).
set -euo pipefail
cd "$(dirname "$0")/.."
export CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" > build-configure.log 2>&1 ||
  { cat build-configure.log; exit 1; }
cmake --build build -j"$(nproc)"
