#!/usr/bin/env bash
# Every check CI runs: formatting, lints, and all tests (unit, property, CLI end-to-end, and one
# pass of each benchmark in test mode). On a fresh Debian machine, run as root, it first installs
# the system packages the build and the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends build-essential ca-certificates
fi

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
# One pass of every benchmark in test mode (compiles and runs them once), then all the tests.
cargo test --locked --bench routers --bench model
cargo test --locked --lib --bins --tests
