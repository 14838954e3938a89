#!/bin/sh
# Installs vmexportfs on PATH and the mount(8) helper as /sbin/mount.vmexportfs.
#
#   mount-helpers/install.sh [BINARY]
#
# BINARY defaults to target/release/vmexportfs in the repository. The binary
# goes to ${PREFIX:-/usr/local}/bin; DESTDIR, if set, is prepended to both
# destinations (for packaging). On merged-/usr systems /sbin is a symlink to
# /usr/sbin, so the helper lands in /usr/sbin; mount(8) finds it either way.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
bin=${1:-$root/target/release/vmexportfs}
prefix=${PREFIX:-/usr/local}
destdir=${DESTDIR:-}

if [ ! -f "$bin" ] || [ ! -x "$bin" ]; then
    echo "install.sh: no vmexportfs binary at $bin; build it first with cargo build --release" >&2
    exit 1
fi
if [ -z "$destdir" ] && [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (it writes $prefix/bin and /sbin)" >&2
    exit 1
fi

install -d "$destdir$prefix/bin" "$destdir/sbin"
install -m 0755 "$bin" "$destdir$prefix/bin/vmexportfs"

# The helper searches a fixed PATH; if the binary went elsewhere, put that
# directory first on the helper's PATH line.
helper=$here/mount.vmexportfs
case :/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin: in
*":$prefix/bin:"*) ;;
*)
    tmp=$(mktemp)
    trap 'rm -f "$tmp"' EXIT
    sed "s|^PATH=|PATH=$prefix/bin:|" "$helper" >"$tmp"
    helper=$tmp
    ;;
esac
install -m 0755 "$helper" "$destdir/sbin/mount.vmexportfs"

echo "installed $destdir$prefix/bin/vmexportfs"
echo "installed $destdir/sbin/mount.vmexportfs"
