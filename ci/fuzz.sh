#!/bin/bash
# Runs every cargo-fuzz target for a short fixed time (FUZZ_SECONDS, 20 by
# default) from its committed seed corpus; a crash fails the run (the
# input is left in fuzz/artifacts/TARGET/). Builds with the machine's
# stable toolchain: RUSTC_BOOTSTRAP lets it take cargo-fuzz's -Z flags
# (AddressSanitizer), as a nightly would.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.12.0
if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi
export RUSTC_BOOTSTRAP=1
seconds=${FUZZ_SECONDS:-20}
export ASAN_OPTIONS=detect_leaks=0

cd fuzz
cargo fuzz build
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for target in $(cargo fuzz list); do
    # New inputs go to a scratch corpus: the committed seeds stay as they are.
    mkdir -p "$work/$target"
    echo "fuzz: $target for ${seconds}s"
    # No leak checks (here and at exit, ASAN_OPTIONS): libFuzzer counts a
    # global the NBD server's threads set up on first use as a leak of the
    # input that got there first (the same input run alone leaks nothing).
    cargo fuzz run "$target" "$work/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 -detect_leaks=0
done
