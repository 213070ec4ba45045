#!/usr/bin/env bash
# The Python package's checks (called by scripts/test.sh; runnable alone): `pip install ./python`
# into a virtual environment, the command line without the app (the reference the package is
# compared with), then `pytest python/tests`.
#
# The environment lives under ~/.cache/routerscope/ (or $ROUTERSCOPE_VENV), named by a hash of
# python/tests/requirements.txt and the interpreter, and is reused while both stay the same:
# torch alone is 5 GB installed. The extension's build folder is kept there too (below).
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python3}"
if ! "$python" -c 'import sys, venv; assert sys.version_info >= (3, 9)' 2>/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      python3 python3-venv python3-pip
  else
    echo "error: the Python tests need python3 >= 3.9 with venv" >&2
    exit 1
  fi
fi

reqs=python/tests/requirements.txt
key=$( (cat "$reqs"; "$python" -c 'import sys; print(sys.version, sys.executable)') | sha256sum | cut -c1-16)
venv="${ROUTERSCOPE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/routerscope/venv-$key}"
if [ ! -f "$venv/.complete" ]; then
  echo "test-python: creating $venv"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q -r "$reqs"
  touch "$venv/.complete"
fi
export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv"

# The extension module, built as a user's `pip install ./python` builds it (maturin), with the
# test profile's settings in a target folder kept between runs: its dependencies resolve to other
# features than the Rust tests' (no dev-dependencies, no app), so it cannot share their build,
# and a clean clone would otherwise compile them all again each time.
cache="${XDG_CACHE_HOME:-$HOME/.cache}/routerscope"
export CARGO_TARGET_DIR="${ROUTERSCOPE_PY_TARGET:-$cache/target-python}"
MATURIN_PEP517_ARGS="--locked --profile python-test" \
  "$venv/bin/python" -m pip install -q --no-build-isolation --no-deps --force-reinstall ./python

# The command line without the app, in the same feature resolution as the extension (both
# packages selected), so it shares its compiled dependencies.
cargo build --locked --profile python-test --no-default-features \
  -p routerscope -p routerscope-python --bin routerscope
export ROUTERSCOPE_CLI="$CARGO_TARGET_DIR/python-test/routerscope" ROUTERSCOPE_REQUIRE_FRAMEWORKS=1

"$venv/bin/python" -m pytest -q -p no:cacheprovider python/tests
