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

# The libblkio frontend suite again with the other engines and O_DIRECT
# (the run above uses the default io_uring engine on the page cache), and
# against qemu-storage-daemon, which passing the same checks shows sound.
VUBD_TEST_AIO=sync cargo test --release -p tests --test frontend
VUBD_TEST_DIRECT=1 cargo test --release -p tests --test frontend
VUBD_TEST_BACKEND=qsd cargo test --release -p tests --test frontend

# Each fuzz target for a short fixed time from its seed corpus.
ci/fuzz.sh
