#!/usr/bin/env bash
# The GPU check, in two halves, for a machine with a GPU but no Rust toolchain and no network.
#
#   scripts/gpu-check.sh prepare   # here: build, strip and xz the two executables, copy the
#                                  # PyTorch reference and the Vulkan loader package into ignored
#                                  # folders (.gpucheck/, .gl/), xz the photo model into .gpucheck,
#                                  # and move what the device does not use out of the checkout (see
#                                  # LEAVE below) so that tree and carry fit the 64 MiB transfer
#   scripts/gpu-check.sh run       # there (carry .gpucheck and .gl): GPU kernel unit tests, then
#                                  # `routerscope gpu-check` (parity on the shipped models and the
#                                  # photo model, CPU and GPU timings with launch/pass/readback
#                                  # counts), `predict --device gpu` against `--device cpu`, and
#                                  # PyTorch CUDA eager on the same shapes; one table at the end,
#                                  # files under $OUT
#   scripts/gpu-check.sh restore   # here, afterwards: put everything back
#
# `run` also works here on lavapipe with GPU_CHECK_ALLOW_SOFTWARE=1 (to time the steps).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-target/gpu-check}"
mkdir -p "$out"
stash="${TMPDIR:-/tmp}/routerscope-gpu-check-stash"
limit=67108864
# Left behind: what only the build, the CI tests and the docs use, the dense Fashion-MNIST model,
# three of the six trained ones (gpu-check puts seeded random stand-ins of the same architecture
# in their place and says so; every router still runs on the others as a what-if) and the five
# distilled photo overlays (23.8 MB; same architecture as the photo model, which travels, and
# their parity runs on lavapipe in CI). The photo model itself (43 MB) travels xz-compressed.
LEAVE=(docs tests python examples benches
  assets/models/fashion-mnist-dense.safetensors
  assets/models/fashion-mnist-sinkhorn-tc.safetensors
  assets/models/fashion-mnist-sinkhorn-ec.safetensors
  assets/models/fashion-mnist-sparse-ec.safetensors
  assets/models/dinov2-s14-softmax-tc.safetensors assets/models/dinov2-s14-sinkhorn-tc.safetensors
  assets/models/dinov2-s14-softmax-ec.safetensors assets/models/dinov2-s14-sinkhorn-ec.safetensors
  assets/models/dinov2-s14-sparse-ec.safetensors
  assets/models/dinov2-s14-moe.safetensors)
photo=assets/models/dinov2-s14-moe.safetensors
# xz without the xz tool (the device may lack it; its python3 has lzma).
unxz_py() { python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$1" "$2"; }

case "${1:-}" in
prepare)
  grep -qx '/.gpucheck/' .git/info/exclude 2>/dev/null || echo /.gpucheck/ >>.git/info/exclude
  grep -qx '/.gl/' .git/info/exclude 2>/dev/null || echo /.gl/ >>.git/info/exclude
  rm -rf .gpucheck && mkdir -p .gpucheck .gl
  # Without the app: no window is opened there, and the binary is smaller.
  cargo build --release --locked --no-default-features --bin routerscope
  lib_test=$(cargo test --release --locked --no-default-features --lib --no-run --message-format=json 2>/dev/null |
    python3 -c 'import sys, json
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"]:
        print(m["executable"])')
  strip -o .gpucheck/routerscope target/release/routerscope
  strip -o .gpucheck/lib-tests "$lib_test"
  xz -T0 -9 -f .gpucheck/routerscope .gpucheck/lib-tests
  cp ../shared/bench/vit_moe_torch.py ../shared/bench/bench_common.py .gpucheck/
  if ! ls .gl/*.deb >/dev/null 2>&1; then
    mkdir -p /tmp/amd64/partial
    o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
    # shellcheck disable=SC2086
    apt-get $o update -q && (cd .gl && apt-get $o download libvulkan1)
  fi
  if [ -f "$photo" ]; then
    xz -T0 -6 -c "$photo" >.gpucheck/dinov2-s14-moe.safetensors.xz
  fi
  for p in "${LEAVE[@]}"; do
    if [ -e "$p" ]; then
      mkdir -p "$stash/$(dirname "$p")" && mv "$p" "$stash/$p"
    fi
  done
  # What the device's copy of the tree holds: the tracked files still here, and untracked ones git
  # does not ignore.
  tracked=$(git ls-files -z --cached --others --exclude-standard |
    python3 -c 'import os, sys; print(sum(os.path.getsize(p) for p in sys.stdin.read().split("\0") if os.path.isfile(p)))')
  carried=$(du -cb .gpucheck .gl | tail -1 | cut -f1)
  echo "travelling: $tracked bytes tracked, $carried bytes carried: $((tracked + carried)) of $limit"
  echo "left behind in $stash until: scripts/gpu-check.sh restore"
  if [ $((tracked + carried)) -gt $limit ]; then
    echo "error: over the 64 MiB transfer; leave more behind (LEAVE above)" >&2
    exit 1
  fi
  ;;
restore)
  for p in "${LEAVE[@]}"; do
    if [ -e "$stash/$p" ] && [ ! -e "$p" ]; then
      mv "$stash/$p" "$p"
    fi
  done
  git status --short
  ;;
run)
  for f in .gl/*.deb; do [ -e "$f" ] && dpkg -x "$f" /; done
  ldconfig 2>/dev/null || true
  if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ] && [ -z "${VK_DRIVER_FILES:-}" ]; then
    export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  fi
  bin=.gpucheck/bin
  mkdir -p "$bin"
  unxz_py .gpucheck/routerscope.xz "$bin/routerscope"
  unxz_py .gpucheck/lib-tests.xz "$bin/lib-tests"
  if [ ! -f "$photo" ] && [ -f .gpucheck/dinov2-s14-moe.safetensors.xz ]; then
    unxz_py .gpucheck/dinov2-s14-moe.safetensors.xz "$photo"
  fi
  chmod +x "$bin/routerscope" "$bin/lib-tests"
  export ROUTERSCOPE_REQUIRE_GPU=1 RUST_BACKTRACE=1
  allow=()
  if [ "${GPU_CHECK_ALLOW_SOFTWARE:-0}" = 1 ]; then allow=(--allow-software); fi
  step() {
    local name=$1
    shift
    local t0=$SECONDS
    echo "== $name"
    if "$@" 2>&1 | tee "$out/$name.log"; then
      echo "== $name: ok ($((SECONDS - t0)) s)"
    else
      echo "== $name: FAILED ($((SECONDS - t0)) s)"
      status=1
    fi
  }
  status=0
  step kernel-tests "$bin/lib-tests" gpu:: --test-threads 1
  step gpu-check "$bin/routerscope" gpu-check "${allow[@]}" --models fashion-mnist,vit-s16,vmoe-b16,photo \
    --iterations "${GPU_CHECK_ITERATIONS:-20}" --json "$out/gpu-check.json"
  imgs=$(ls assets/images/fmnist-0*.png | head -4)
  # shellcheck disable=SC2086
  "$bin/routerscope" predict --device cpu --json --model assets/models/fashion-mnist-softmax-ec.safetensors $imgs >"$out/predict-cpu.json"
  echo "== predict-gpu"
  # shellcheck disable=SC2086
  "$bin/routerscope" predict --device gpu --json --model assets/models/fashion-mnist-softmax-ec.safetensors $imgs >"$out/predict-gpu.json" || status=1
  python3 - "$out" <<'EOF' || status=1
import json, re, sys
out = sys.argv[1]
cpu = json.load(open(f"{out}/predict-cpu.json"))
gpu = json.load(open(f"{out}/predict-gpu.json"))
print("predict --device", gpu["device"], "vs", cpu["device"])
bad = 0
for a, b in zip(cpu["images"], gpu["images"]):
    same = [x["tokens_per_expert"] for x in a["layers"]] == [x["tokens_per_expert"] for x in b["layers"]]
    dp = max(abs(x["probability"] - y["probability"]) for x, y in zip(a["top5"], b["top5"]))
    print(f"  {a['image']}: tokens per expert {'equal' if same else 'DIFFER'}, max top-5 dp {dp:.1e}")
    bad += (not same) or dp >= 1e-3
sys.exit(1 if bad else 0)
EOF
  if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    step pytorch-cuda python3 .gpucheck/vit_moe_torch.py infer --device cuda --threads 2 \
      --models fashion,vits,vmoe-b16 --routers tc --modes eager
    # The photo model's shape: PyTorch's dense DINOv2-S/14 (its MoE layers do less work than the
    # dense MLPs they replace, so this reference is if anything faster than the same MoE).
    step pytorch-cuda-dinov2 python3 .gpucheck/vit_moe_torch.py infer --device cuda --threads 2 \
      --models dinov2 --routers dense --modes eager
  else
    echo "== pytorch-cuda: skipped (no CUDA PyTorch here)"
  fi
  echo
  echo "== summary"
  sed -n '/^| model | CPU forward/,$p' "$out/gpu-check.log" | grep '^|' || true
  cat "$out/pytorch-cuda.log" "$out/pytorch-cuda-dinov2.log" 2>/dev/null | grep -h '^infer '  | awk '{print "| PyTorch CUDA eager", $2, $3, "| median", $10, $11, "|"}' || true
  exit $status
  ;;
*)
  echo "usage: $0 prepare|run|restore" >&2
  exit 2
  ;;
esac
