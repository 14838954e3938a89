#!/bin/sh
# Builds the Debian package target/debian/vmexportfs_VERSION_ARCH.deb.
#
#   scripts/package.sh [--no-build]
#
# --no-build packs the release binary already in target/release (CI's tests
# build it once). Needs cargo-deb (`cargo install cargo-deb --locked`;
# scripts/install-test-deps.sh installs it).
set -eu
cd "$(dirname "$0")/.."

build=1
case ${1:-} in
--no-build) build= ;;
'') ;;
*)
    echo "usage: scripts/package.sh [--no-build]" >&2
    exit 1
    ;;
esac
command -v cargo-deb >/dev/null 2>&1 || {
    echo "package.sh: cargo-deb is not installed (cargo install cargo-deb --locked)" >&2
    exit 1
}
[ -n "$build" ] && cargo build --release --bin vmexportfs
[ -x target/release/vmexportfs ] || {
    echo "package.sh: no target/release/vmexportfs; run without --no-build" >&2
    exit 1
}

out=target/package
rm -rf "$out"
mkdir -p "$out"
target/release/vmexportfs generate-docs "$out"
# The packaged helper runs the packaged binary, not one a user installed
# under /usr/local with mount-helpers/install.sh.
sed 's|^PATH=.*|PATH=/usr/bin:/usr/sbin:/bin:/sbin|' mount-helpers/mount.vmexportfs >"$out/mount.vmexportfs"
grep -q '^PATH=/usr/bin:' "$out/mount.vmexportfs"
# Debian ships manual pages compressed.
gzip -9n "$out"/man8/*.8
# Stripped: the debug info would take the binary from about 100 MB to 375 MB.
cargo deb --no-build --strip --output target/debian/
