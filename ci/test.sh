#!/bin/bash
# The whole test suite, from a fresh Debian 12 machine with a Rust toolchain:
# system packages, Python client library, build, guest image, lint, tests.
set -euo pipefail
cd "$(dirname "$0")/.."

ci/install-deps.sh
python3 -m pip install --quiet --disable-pip-version-check qemu.qmp pytest

cargo build --release --workspace --bins
ci/build-initramfs.sh

cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets -- -D warnings

export VUBD_BIN="$PWD/target/release/vubd"
cargo test --release --workspace --no-fail-fast
