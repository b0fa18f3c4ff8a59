# Sourced by the scripts that run on the GPU machine: $out for their logs ($OUT there), the
# bundled C++ dependencies, and gpu_build.
out="${OUT:-/tmp/lorafit-gpu}"
mkdir -p "$out"
source .gpu-deps/env.sh
export PYTHONUNBUFFERED=1

# gpu_build NAME [TARGET...]: builds build-gpu/ (every target when none is named), logging to
# $out/NAME-build.log; on a failure prints the errors and ends the script.
gpu_build() {
  local name=$1
  shift
  local targets=()
  (($#)) && targets=(--target "$@")
  { cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release &&
    cmake --build build-gpu -j"$(nproc)" "${targets[@]}"; } > "$out/$name-build.log" 2>&1 ||
    { grep -m20 -A3 -i error "$out/$name-build.log" || tail -30 "$out/$name-build.log"; exit 1; }
}
