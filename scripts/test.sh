#!/usr/bin/env bash
# Installs the dependencies, builds, and runs every test that needs no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
ctest --test-dir build --label-exclude gpu --output-on-failure -j"$(nproc)"
