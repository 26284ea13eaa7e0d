#!/usr/bin/env python3
"""Build the Debian test guest: Debian 12 minbase with systemd, from Debian's packages.

mmdebstrap writes the root file system into a directory (as root; in a user
namespace otherwise) and `mke2fs -d` makes a 2 GiB ext4 disk of it: no loop
devices or mounts. Kernel and initramfs are the small guest's
(scripts/build-guest.py: the host's Debian kernel, its virtio and ext4 modules
in a busybox initramfs that mounts /dev/vda and hands over to /sbin/init, here
systemd). The guest boots like any Debian server: systemd, udev, journald,
D-Bus, a getty on the serial console; when multi-user.target is reached a unit
prints the marker line and the number of failed units on the serial console
and powers the VM off.

Cached in .cache/debian-guest/, rebuilt when this script, the package list or
the kernel changes. guest.json names the marker and what the disk holds.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(os.environ.get("RBD_RESTORE_DEBIAN_GUEST_DIR", ROOT / ".cache" / "debian-guest"))
SUITE = "bookworm"
PACKAGES = ["systemd-sysv", "udev", "dbus", "kmod", "procps"]
DISK_BYTES = 2 << 30
MARKER = "RBD-RESTORE-DEBIAN-BOOTED"

MARKER_UNIT = """[Unit]
Description=Tell the host the boot is done, then power off
After=multi-user.target

[Service]
Type=oneshot
StandardOutput=tty
TTYPath=/dev/ttyS0
ExecStart=/usr/local/sbin/rbd-restore-marker
ExecStartPost=/bin/systemctl poweroff --no-block

[Install]
WantedBy=multi-user.target
"""


MARKER_SCRIPT = f"""#!/bin/sh
failed=$(systemctl list-units --state=failed --no-legend --plain | wc -l)
echo "{MARKER} failed-units=$failed"
"""


def _small_guest() -> Any:
    """scripts/build-guest.py, whose kernel and initramfs this guest boots with."""
    spec = importlib.util.spec_from_file_location("build_guest", ROOT / "scripts" /
                                                  "build-guest.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def configure(rootfs: Path) -> None:
    (rootfs / "etc" / "hostname").write_text("rbd-restore-guest\n")
    # The initramfs mounted the root read-write already: no fsck pass for it.
    (rootfs / "etc" / "fstab").write_text("/dev/vda / ext4 defaults 0 0\n")
    (rootfs / "etc" / "machine-id").write_text("")  # a fresh id on each boot, as images do
    script = rootfs / "usr" / "local" / "sbin" / "rbd-restore-marker"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(MARKER_SCRIPT)
    script.chmod(0o755)
    unit = rootfs / "etc" / "systemd" / "system" / "rbd-restore-marker.service"
    unit.write_text(MARKER_UNIT)
    wants = rootfs / "etc" / "systemd" / "system" / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / unit.name).symlink_to(f"/etc/systemd/system/{unit.name}")


def build(out: Path, disk_bytes: int) -> dict[str, object]:
    small = _small_guest()
    release: str = small.kernel_release()
    small.write_initramfs(out / "initrd.img.tmp", release)
    with tempfile.TemporaryDirectory() as tmp:
        rootfs = Path(tmp) / "rootfs"
        mode = [] if os.geteuid() == 0 else ["--mode=unshare"]
        subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase", *mode,
                        f"--include={','.join(PACKAGES)}", SUITE, str(rootfs)], check=True)
        configure(rootfs)
        used = sum(f.stat().st_size for f in rootfs.rglob("*") if f.is_file()
                   and not f.is_symlink())
        image = out / "root.img.tmp"
        image.unlink(missing_ok=True)
        subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-E", "root_owner=0:0",
                        "-L", "debianroot", "-d", str(rootfs), str(image),
                        str(disk_bytes // 1024)], check=True)
    shutil.copy(f"/boot/vmlinuz-{release}", out / "vmlinuz")
    os.replace(out / "initrd.img.tmp", out / "initrd.img")
    os.replace(out / "root.img.tmp", out / "root.img")
    return {"kernel_release": release, "marker": MARKER,
            "suite": SUITE, "packages": PACKAGES, "disk_bytes": disk_bytes,
            "files_bytes": used}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--disk-size", type=int, default=DISK_BYTES, help="bytes")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    stamp = hashlib.sha256(Path(__file__).read_bytes()
                           + (ROOT / "scripts" / "build-guest.py").read_bytes()
                           + f"{args.disk_size}:{_small_guest().kernel_release()}".encode()
                           ).hexdigest()[:16]
    info = _small_guest().build_cached(out, stamp, "debian guest",
                                       lambda: build(out, args.disk_size))
    if info is None:
        return 0
    print(f"debian guest: built in {out} ({info['files_bytes']} bytes of files, "
          f"kernel {info['kernel_release']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
