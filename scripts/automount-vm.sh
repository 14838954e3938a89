#!/bin/sh
# Tests `x-systemd.automount` and `x-systemd.idle-timeout` with a real
# systemd and a real autofs: the machines we build on have neither (their
# kernel has no autofs, PID 1 is not systemd), so this boots a Debian guest
# under qemu (software emulation: /dev/kvm on these machines fails at the
# first MSR write; VMEXPORTFS_VM_ACCEL=kvm asks for it elsewhere), installs
# the package built from target/release into it, and runs
# scripts/automount-vm/check in the guest as a boot-time service. The check
# prints "AUTOMOUNT: ..." lines on the serial console and ends with
# "AUTOMOUNT-RESULT: PASS" or "AUTOMOUNT-RESULT: FAIL"; so does this script.
#
#   scripts/automount-vm.sh [--no-build]
#
# The guest's root (debootstrap, about 80 s and 780 MB the first time) is
# kept under target/automount-vm/ and reused while its package list is the
# same. --no-build packs the release binary already built.
set -eu
cd "$(dirname "$0")/.."

build=
case ${1:-} in
--no-build) ;;
'') build=1 ;;
*)
    echo "usage: scripts/automount-vm.sh [--no-build]" >&2
    exit 1
    ;;
esac
me=automount-vm
die() {
    echo "$me: $*" >&2
    echo "AUTOMOUNT-RESULT: FAIL"
    exit 1
}
for tool in debootstrap qemu-system-x86_64 mke2fs; do
    command -v $tool >/dev/null 2>&1 || die "$tool is not installed (scripts/install-test-deps.sh installs it)"
done
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot)"

vm=target/automount-vm
root=$vm/root
suite=bookworm
packages=systemd,systemd-sysv,udev,kmod,fuse3,linux-image-amd64,procps
stamp="$suite $packages"
if [ "$(cat $vm/root.stamp 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$root" $vm/root.stamp
    mkdir -p $vm
    echo "$me: building the guest's root with debootstrap ($suite)" >&2
    debootstrap --variant=minbase --include=$packages $suite "$root" \
        "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >$vm/debootstrap.log 2>&1 ||
        die "debootstrap failed; see $vm/debootstrap.log"
    # Not needed to boot, and mke2fs copies every byte of it at each run.
    rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/* \
        "$root"/lib/modules/*/kernel/drivers/gpu "$root"/lib/modules/*/kernel/sound \
        "$root"/lib/modules/*/kernel/drivers/net/wireless "$root"/lib/modules/*/kernel/drivers/media \
        "$root"/lib/modules/*/kernel/drivers/infiniband
    echo "$stamp" >$vm/root.stamp
fi

[ -n "$build" ] && cargo build --release --bin vmexportfs
sh scripts/package.sh --no-build >$vm/package.log 2>&1 || die "packaging failed; see $vm/package.log"
deb=$(ls -t target/debian/vmexportfs_*.deb | head -n 1)
cp "$deb" "$root/tmp/vmexportfs.deb"
chroot "$root" dpkg -i /tmp/vmexportfs.deb >$vm/dpkg.log 2>&1 || die "dpkg -i in the guest failed; see $vm/dpkg.log"
rm -f "$root/tmp/vmexportfs.deb"

# The guest: an fstab automount of demo:// (the inventory needs no network),
# and the check as a service that powers the guest off when done.
mkdir -p "$root/mnt/auto" "$root/mnt/direct"
cat >"$root/etc/fstab" <<'EOF'
/dev/vda / ext4 rw 0 1
demo:// /mnt/auto vmexportfs ro,nofail,x-systemd.automount,x-systemd.idle-timeout=4,x-systemd.mount-timeout=30 0 0
EOF
install -m 755 scripts/automount-vm/check "$root/usr/local/bin/automount-check"
cat >"$root/etc/systemd/system/automount-check.service" <<'EOF'
[Unit]
Description=vmexportfs automount check
After=local-fs.target systemd-tmpfiles-setup.service
[Service]
Type=oneshot
ExecStart=/usr/local/bin/automount-check
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/automount-check.service "$root/etc/systemd/system/multi-user.target.wants/automount-check.service"
# A getty on the serial console would hang up the check's output there.
ln -sf /dev/null "$root/etc/systemd/system/serial-getty@ttyS0.service"
echo vmexportfs-vm >"$root/etc/hostname"

kernel=$(ls "$root"/boot/vmlinuz-* | tail -n 1)
initrd=$(ls "$root"/boot/initrd.img-* | tail -n 1)
rm -f $vm/disk.img
mke2fs -q -t ext4 -d "$root" $vm/disk.img 2G || die "mke2fs -d failed"

accel=${VMEXPORTFS_VM_ACCEL:-tcg}
echo "$me: booting the guest (qemu, $accel)" >&2
console=$vm/console.log
rm -f $console
# Under software emulation the guest boots in about 15 s; the check takes
# about 30 s more.
timeout 600 qemu-system-x86_64 -accel $accel -m 1024 -smp 2 -nographic -no-reboot \
    -kernel "$kernel" -initrd "$initrd" \
    -append "root=/dev/vda rw console=ttyS0 quiet loglevel=3 systemd.show_status=false panic=-1" \
    -drive file=$vm/disk.img,format=raw,if=virtio \
    -nic none -serial file:$console -monitor none </dev/null >$vm/qemu.log 2>&1 || true
grep -a 'AUTOMOUNT' $console || true
grep -aq 'AUTOMOUNT-RESULT: PASS' $console || {
    echo "$me: the check did not pass; the guest's console is in $console" >&2
    grep -aq 'AUTOMOUNT-RESULT' $console || echo "AUTOMOUNT-RESULT: FAIL"
    exit 1
}
