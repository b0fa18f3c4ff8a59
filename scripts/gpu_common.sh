# Sourced by the scripts that run on the GPU machine: $out for their logs ($OUT there), the
# bundled C++ dependencies, and gpu_build.
out="${OUT:-/tmp/lorafit-gpu}"
mkdir -p "$out"
source .gpu-deps/env.sh
export PYTHONUNBUFFERED=1

# gpu_build NAME [TARGET...]: builds build-gpu/ (every target when none is named), logging to
# $out/NAME-build.log; on a failure prints the errors and ends the script. With PREBUILT=1 it
# builds nothing: build-gpu/ then holds binaries from an earlier call's build, brought back from
# its $OUT and carried in (the binaries and liblorafit_sentencepiece.so), which saves a call the
# 2-3 minutes of a cold build.
gpu_build() {
  [ "${PREBUILT:-0}" = 1 ] && return 0
  local name=$1
  shift
  local targets=()
  (($#)) && targets=(--target "$@")
  { cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release &&
    cmake --build build-gpu -j"$(nproc)" "${targets[@]}"; } > "$out/$name-build.log" 2>&1 ||
    { grep -m20 -A3 -i error "$out/$name-build.log" || tail -30 "$out/$name-build.log"; exit 1; }
}
