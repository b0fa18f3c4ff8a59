#!/usr/bin/env bash
# Configures and builds lorafit in build/ (Release, Ninja, ccache when present, warnings as
# errors). Arguments are targets (default: everything, tests included); the quickstart builds
# only `lorafit`, and a later full build reuses what it compiled.
set -euo pipefail
cd "$(dirname "$0")/.."
export CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DLORAFIT_WARNINGS_AS_ERRORS=ON \
  > build-configure.log 2>&1 || { cat build-configure.log; exit 1; }
targets=()
(($#)) && targets=(--target "$@")
cmake --build build -j"$(nproc)" "${targets[@]}"
