#!/usr/bin/env bash
# Installs what lorafit needs to build and test on Debian 12 (idempotent; apt only).
set -euo pipefail
# libopenblas0-openmp: Debian's LibTorch calls the system BLAS, which is otherwise netlib's
# reference BLAS; OpenBLAS makes CPU training about 9x faster (scripts/experiment_multitask.sh).
# libgloo-dev: the headers of Gloo, c10d's CPU backend (data-parallel training on CPUs).
# libpcre2-dev, libutf8proc-dev: tokenizer.json's Unicode regexes and normalization.
packages=(build-essential cmake ninja-build ccache libtorch-dev libyaml-cpp-dev libcli11-dev
          libsentencepiece-dev libfmt-dev catch2 nlohmann-json3-dev libopenblas0-openmp
          libgloo-dev libpcre2-dev libutf8proc-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  echo "installing: ${missing[*]}"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
