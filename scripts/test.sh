#!/bin/sh
# The one test command: installs what the tests need, then checks format and
# lints and runs every test. The mount tests need root (FUSE mounts) and run
# one at a time, so that throttle measurements are not skewed by each other.
set -eu
cd "$(dirname "$0")/.."

sh scripts/install-test-deps.sh
cargo fmt --check
cargo clippy --release --all-targets -- -D warnings
cargo test --release -- --test-threads=1
