#!/usr/bin/env bash
# Installs the dependencies, builds, and runs every test that needs no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh -DLORAFIT_WARNINGS_AS_ERRORS=ON
ctest --test-dir build --label-exclude gpu --output-on-failure -j"$(nproc)"
