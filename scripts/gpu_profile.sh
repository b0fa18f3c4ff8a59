#!/usr/bin/env bash
# Where a training step's GPU time goes, for lorafit and for PEFT (eager and compiled), on the
# shapes of issue 4: the floor that the step's unavoidable GEMMs and attention set on this GPU
# (scripts/gemm_floor.py), Chrome traces under $OUT and a summary of each
# (scripts/profile_summary.py). Builds build-gpu/; needs .gpu-deps. Checkpointed rows keep
# KEEP (default "attention,residual"; "none" recomputes everything).
#   ROWS="llama-1b:2048:4:0" PEFT=1 bash scripts/gpu_profile.sh
set -uo pipefail
source scripts/gpu_common.sh
rows="${ROWS:-llama-1b:2048:4:0}"
keep="${KEEP:-attention,residual}"
gpu_build profile lorafit
python3 scripts/gemm_floor.py $rows
for row in $rows; do
  IFS=: read -r shape seq batch ckpt <<< "$row"
  sets=(--set train.gradient_checkpointing=$([ "$ckpt" = 1 ] && echo true || echo false))
  [ "$ckpt" = 1 ] && [ "$keep" != none ] && sets+=(--set "train.checkpoint_keep=[$keep]")
  tag="${shape}_${seq}x${batch}"
  trace="$out/lorafit_$tag.json"
  ./build-gpu/lorafit bench --shape "$shape" --seq "$seq" --batch "$batch" --device cuda \
    "${sets[@]}" --json > "$out/lorafit_$tag.bench.json"
  ./build-gpu/lorafit bench --shape "$shape" --seq "$seq" --batch "$batch" --device cuda \
    --steps 2 "${sets[@]}" --profile "$trace"
  echo "== lorafit $row: $(cat "$out/lorafit_$tag.bench.json")"
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
