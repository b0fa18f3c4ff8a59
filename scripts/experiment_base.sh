# Sourced by the experiment scripts: `base_model RECIPE TRAIN VALID` makes $out/base/model, the
# small base model an experiment starts from, unless it is there: a link to $BASE when set
# (a base made before), else `lorafit init --from $data/base` and full fine-tuning with RECIPE
# on the data files TRAIN and VALID under $data. Uses $out, $bin, $device and $data.
base_model() {
  if [ -n "${BASE:-}" ]; then
    mkdir -p "$out/base" && ln -sfn "$(realpath "$BASE")" "$out/base/model"
  elif [ ! -f "$out/base/model/model.safetensors" ]; then
    rm -rf "$out/init"
    "$bin" init --from "$data/base" --out "$out/init" --seed 0
    "$bin" train "$1" --device "$device" --set model="$out/init" --set output="$out/base" \
      --set data.train="$data/$2" --set data.valid="$data/$3" 2> "$out/base.log"
  fi
}
