#!/usr/bin/env bash
# Where a training step's GPU time goes, for lorafit and for PEFT (eager and compiled), on the
# shapes of issue 4: Chrome traces under $OUT and a summary of each (scripts/profile_summary.py).
# Needs build-gpu and .gpu-deps.   ROWS="llama-1b:2048:4:0" PEFT=1 bash scripts/gpu_profile.sh
set -uo pipefail
out="${OUT:-/tmp/lorafit-gpu}"
mkdir -p "$out"
source .gpu-deps/env.sh
rows="${ROWS:-llama-1b:2048:4:0}"
for row in $rows; do
  IFS=: read -r shape seq batch ckpt <<< "$row"
  flag=$([ "$ckpt" = 1 ] && echo true || echo false)
  tag="${shape}_${seq}x${batch}"
  trace="$out/lorafit_$tag.json"
  ./build-gpu/lorafit bench --shape "$shape" --seq "$seq" --batch "$batch" --device cuda \
    --steps 2 --set train.gradient_checkpointing=$flag --profile "$trace"
  echo "== lorafit $row"
  python3 scripts/profile_summary.py "$trace" --steps 2
  if [ "${PEFT:-1}" = 1 ]; then
    for compiled in 0 1; do
      ptrace="$out/peft${compiled}_$tag.json"
      PEFT_PROFILE="$ptrace" python3 scripts/peft_bench.py "$shape" "$seq" "$batch" "$ckpt" "$compiled" 2>> "$out/peft.log"
      echo "== PEFT (compiled=$compiled) $row"
      python3 scripts/profile_summary.py "$ptrace" --steps 2
    done
  fi
  gzip -f "$out"/*_"$tag".json
done
