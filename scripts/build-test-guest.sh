#!/bin/sh
# Build the tiny test guest used by tests/guests and the migration tests: a Debian
# cloud kernel plus a busybox initramfs whose init keeps rewriting a tmpfs working set
# and prints "corral-counter N" lines to the first serial port (ttyS0).
#
# Usage: scripts/build-test-guest.sh [OUTPUT_DIR]   (default $CORRAL_TEST_GUEST_DIR or
#        /var/cache/corral/test-guest). Idempotent: does nothing when the outputs exist
#        and this script has not changed. Kernel command line knobs read by init:
#        corral.dirty=MIB (working set rewritten continuously, default 16, 0 = idle)
#        corral.period=SECONDS (pause between counter steps, default 0.2),
#        corral.noacpi (ignore the ACPI power button, to test forced shutdowns).
set -eu

OUT="${1:-${CORRAL_TEST_GUEST_DIR:-/var/cache/corral/test-guest}}"
SCRIPT_SUM="$(sha256sum "$0" | cut -d' ' -f1)"
if [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initrd.img" ] && \
   [ "$(cat "$OUT/build.sum" 2>/dev/null)" = "$SCRIPT_SUM" ]; then
    echo "test guest up to date in $OUT"
    exit 0
fi

need=""
command -v qemu-system-x86_64 >/dev/null || need="$need qemu-system-x86"
command -v qemu-img >/dev/null || need="$need qemu-utils"
[ -x /bin/busybox ] && /bin/busybox --list | grep -qx sh && \
    dpkg -s busybox-static >/dev/null 2>&1 || need="$need busybox-static"
command -v cpio >/dev/null || need="$need cpio"
if [ -n "$need" ]; then
    echo "installing:$need"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $need
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT INT TERM
mkdir -p "$OUT"

# Kernel: a Debian cloud kernel package unpacked locally (the host's own /boot is not
# touched, and no kernel package gets installed on the host).
KERNEL_PKG="$(apt-cache depends linux-image-cloud-amd64 | sed -n 's/.*Depends: \(linux-image-[^ ]*\)$/\1/p' | head -n1)"
[ -n "$KERNEL_PKG" ] || { echo "cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
( cd "$WORK" && apt-get download "$KERNEL_PKG" >/dev/null )
dpkg-deb -x "$WORK"/linux-image-*.deb "$WORK/kernel"
cp "$WORK"/kernel/boot/vmlinuz-* "$OUT/vmlinuz.new"

# Initramfs: busybox-static and an init script.
ROOT="$WORK/root"
mkdir -p "$ROOT/bin" "$ROOT/proc" "$ROOT/sys" "$ROOT/dev" "$ROOT/tmp"
cp /bin/busybox "$ROOT/bin/busybox"
ln -s busybox "$ROOT/bin/sh"
# ACPI power button -> poweroff, so `qm shutdown` works without --forceStop: the
# button and evdev drivers are modules in the cloud kernel; busybox acpid runs the
# script for the power button's event.
MODDIR="$(echo "$WORK"/kernel/lib/modules/*/kernel)"
mkdir -p "$ROOT/lib" "$ROOT/etc/acpi/PWRF"
cp "$MODDIR/drivers/input/evdev.ko" "$MODDIR/drivers/acpi/button.ko" "$ROOT/lib/"
printf '#!/bin/sh\necho "corral-guest powering off" > /dev/ttyS0\nsync\npoweroff -f\n' \
    > "$ROOT/etc/acpi/PWRF/00000080"
chmod 755 "$ROOT/etc/acpi/PWRF/00000080"
cat > "$ROOT/init" <<'INIT'
#!/bin/sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /dev/shm && mount -t tmpfs -o size=95% tmpfs /dev/shm
insmod /lib/evdev.ko 2>/dev/null
insmod /lib/button.ko 2>/dev/null
dirty=16
acpi=1
period=0.2
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        corral.dirty=*) dirty="${arg#corral.dirty=}" ;;
        corral.period=*) period="${arg#corral.period=}" ;;
        corral.noacpi) acpi=0 ;;
    esac
done
[ "$acpi" = 1 ] && acpid -c /etc/acpi -l /dev/null
dd if=/dev/urandom of=/tmp/seed bs=64k count=16 2>/dev/null
echo "corral-guest up dirty=${dirty}MiB" > /dev/ttyS0
i=0
while true; do
    i=$((i + 1))
    if [ "$dirty" -gt 0 ]; then
        dd if=/tmp/seed of=/dev/shm/work bs=1M seek=$((i % dirty)) count=1 conv=notrunc 2>/dev/null
    fi
    echo "$i" > /dev/shm/counter
    echo "corral-counter $i" > /dev/ttyS0
    sleep "$period"
done
INIT
chmod 755 "$ROOT/init"
( cd "$ROOT" && find . | cpio -o -H newc --quiet | gzip -9 ) > "$OUT/initrd.img.new"

mv "$OUT/vmlinuz.new" "$OUT/vmlinuz"
mv "$OUT/initrd.img.new" "$OUT/initrd.img"
echo "$KERNEL_PKG" > "$OUT/kernel-package"
echo "$SCRIPT_SUM" > "$OUT/build.sum"
echo "test guest built in $OUT ($KERNEL_PKG, initrd $(stat -c %s "$OUT/initrd.img") bytes)"
