"""The test guest with a working virtio NIC, for the network counter tests: the project's
test guest initramfs (scripts/build-test-guest.sh) plus an appended archive holding the
virtio-net modules of the same Debian kernel and `/netinit` (started with
`rdinit=/netinit`), which loads them, configures eth0 from `corral.net=ADDR/LEN,PEER`
and pings PEER every 0.5 s in the background before handing over to the usual /init.
Built once into `<test guest dir>-net` (kept while the kernel package is the same)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
           "virtio_pci", "failover", "net_failover", "virtio_net")
NETINIT = """#!/bin/busybox sh
b=/bin/busybox
$b mkdir -p /proc /sys /dev
$b mount -t proc proc /proc
$b mount -t devtmpfs dev /dev
for m in MODULES; do $b insmod /lib/net/$m.ko; done
for arg in $($b cat /proc/cmdline); do
    case "$arg" in corral.net=*) net="${arg#corral.net=}" ;; esac
done
if [ -n "$net" ]; then
    $b ip addr add "${net%,*}" dev eth0
    $b ip link set eth0 up
    (while true; do $b ping -c 1 -W 1 "${net#*,}" >/dev/null 2>&1; $b sleep 0.5; done) &
fi
exec /init
""".replace("MODULES", " ".join(MODULES))


def build_net_guest(guest_dir: str) -> str:
    """The directory holding vmlinuz + initrd.img of the networked test guest."""
    out = guest_dir.rstrip("/") + "-net"
    with open(os.path.join(guest_dir, "kernel-package"), encoding="ascii") as handle:
        package = handle.read().strip()
    stamp = f"{package} {os.path.getsize(os.path.join(guest_dir, 'initrd.img'))}\n"
    stamp_path = os.path.join(out, "stamp")
    if os.path.exists(stamp_path) and open(stamp_path, encoding="ascii").read() == stamp:
        return out
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="crl-st-guest-")
    try:
        subprocess.run(["apt-get", "download", package], cwd=work, check=True,
                       capture_output=True, timeout=600)
        deb = next(name for name in os.listdir(work) if name.endswith(".deb"))
        subprocess.run(["dpkg-deb", "-x", deb, "kernel"], cwd=work, check=True, timeout=300)
        root = os.path.join(work, "root")
        os.makedirs(os.path.join(root, "lib", "net"))
        found = {name[:-3]: os.path.join(directory, name)
                 for directory, _, names in os.walk(os.path.join(work, "kernel", "lib"))
                 for name in names if name.endswith(".ko")}
        for module in MODULES:
            shutil.copy(found[module], os.path.join(root, "lib", "net", f"{module}.ko"))
        with open(os.path.join(root, "netinit"), "w", encoding="ascii") as handle:
            handle.write(NETINIT)
        os.chmod(os.path.join(root, "netinit"), 0o755)
        overlay = subprocess.run("find . | cpio -o -H newc --quiet | gzip -9", shell=True,
                                 cwd=root, check=True, capture_output=True, timeout=300).stdout
        with open(os.path.join(guest_dir, "initrd.img"), "rb") as handle:
            base = handle.read()
        with open(os.path.join(out, "initrd.img.new"), "wb") as handle:
            handle.write(base + overlay)
        os.replace(os.path.join(out, "initrd.img.new"), os.path.join(out, "initrd.img"))
        shutil.copy(os.path.join(guest_dir, "vmlinuz"), os.path.join(out, "vmlinuz"))
        with open(stamp_path, "w", encoding="ascii") as handle:
            handle.write(stamp)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def net_guest_settings(net_dir: str, address: str, peer: str, bridge: str) -> dict[str, str]:
    return {"memory": "128", "serial0": "socket",
            "net0": f"virtio=52:54:00:12:34:56,bridge={bridge}",
            "args": f"-kernel {net_dir}/vmlinuz -initrd {net_dir}/initrd.img -append "
                    f"'console=ttyS0 quiet panic=-1 rdinit=/netinit corral.dirty=0 "
                    f"corral.net={address},{peer}'"}
