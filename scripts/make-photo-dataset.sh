#!/usr/bin/env bash
# Regenerates the built-in photo dataset assets/datasets/photos/ ("Photos (built-in)" in the
# Dataset view): the nine gallery photos of assets/images/ (copied byte for byte) and ten more
# public-domain / CC0 pictures from scikit-image 0.26.0's skimage/data/ and scikit-learn 1.9.1's
# china.jpg (CC-BY 2.0), resized to 256 px on the long side, one subfolder per subject (the class).
# Licences: assets/datasets/photos/README.md. Needs pip (wheels are downloaded, not installed;
# Pillow goes into a throw-away virtual environment).
#
#   scripts/make-photo-dataset.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-$(mktemp -d)}"
mkdir -p "$work/wheels"
for pkg in scikit-image==0.26.0 scikit-learn==1.9.1; do
  pip download -q --no-deps --only-binary :all: -d "$work/wheels" "$pkg"
done
[ -x "$work/venv/bin/python" ] || python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q pillow==13.0.0
out=assets/datasets/photos
rm -rf "$out"/*/
copy() { mkdir -p "$out/$1"; cp "assets/images/photo-$2" "$out/$1/$2"; }
copy animals chelsea.png
copy animals horse.png
copy people astronaut.png
copy people camera.png
copy objects coffee.png
copy objects coins.jpg
copy space hubble.jpg
copy space rocket.jpg
copy scenes flower.jpg
"$work/venv/bin/python" - "$work/wheels" "$out" <<'PY'
import glob, io, os, sys, zipfile
from PIL import Image
wheels, out = sys.argv[1], sys.argv[2]
skimage = zipfile.ZipFile(glob.glob(os.path.join(wheels, "scikit_image-0.26.0-*.whl"))[0])
sklearn = zipfile.ZipFile(glob.glob(os.path.join(wheels, "scikit_learn-1.9.1-*.whl"))[0])
picks = [
    (skimage, "skimage/data/clock_motion.png", "objects/clock.png"),
    (skimage, "skimage/data/brick.png", "textures/brick.png"),
    (skimage, "skimage/data/grass.png", "textures/grass.png"),
    (skimage, "skimage/data/gravel.png", "textures/gravel.png"),
    (skimage, "skimage/data/cell.png", "microscopy/cell.png"),
    (skimage, "skimage/data/ihc.png", "microscopy/ihc.png"),
    (skimage, "skimage/data/retina.jpg", "microscopy/retina.jpg"),
    (skimage, "skimage/data/microaneurysms.png", "microscopy/microaneurysms.png"),
    (skimage, "skimage/data/text.png", "text/text.png"),
    (sklearn, "sklearn/datasets/images/china.jpg", "scenes/china.jpg"),
]
for wheel, member, dest in picks:
    im = Image.open(io.BytesIO(wheel.read(member)))
    im.load()
    scale = 256 / max(im.size)
    if scale < 1:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)
    path = os.path.join(out, dest)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if dest.endswith(".jpg"):
        im.convert("RGB").save(path, quality=90)
    else:
        im.save(path, optimize=True)
    print(dest, im.size, im.mode)
PY
du -sh "$out"
