#!/usr/bin/env python3
"""Build the small test guest: the host's Debian kernel, an initramfs and an ext4 root.

No loop devices, mounts or root rights: the initramfs is a cpio archive written
by `cpio`, the root file system is made by `mke2fs -d` from a directory. The
result is cached in .cache/guest/ and rebuilt only when this script changes.

The guest's /sbin/init reads its data set, prints each file's sha256 and the
marker line, writes /written-by-guest, syncs and powers off. guest.json records
the expected checksums and the marker, for the tests and the demo.

``--disk-size`` and ``--bulk`` make the demo's volume: a larger file system that
also holds ``--bulk`` bytes of application data in /srv, which the boot does
not read (incompressible, like most data that matters).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(os.environ.get("RBD_RESTORE_GUEST_DIR", ROOT / ".cache" / "guest"))
MARKER = "RBD-RESTORE-GUEST-BOOTED"
DATA_FILES = {f"data/blob{i:02d}.bin": 6 << 20 for i in range(8)}  # 48 MiB read at boot
DISK_BYTES = 1 << 30
MODULES = ["virtio_pci", "virtio_blk", "crc32c_generic", "ext4"]

INITRAMFS_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /lib/modules/$m.ko || echo "insmod $m failed"; done
for i in $(seq 1 300); do [ -b /dev/vda ] && break; sleep 0.1; done
mount -t ext4 /dev/vda /newroot || { echo "RBD-RESTORE-GUEST-FAILED mount"; poweroff -f; }
exec switch_root /newroot /sbin/init
"""

ROOT_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t devtmpfs dev /dev 2>/dev/null
cd /
for f in $(find data -type f | sort); do
  echo "RBD-RESTORE-GUEST-SUM $(sha256sum $f)"
done
echo "MARKER_LINE"
date +%s > /written-by-guest
echo "written by the guest" >> /written-by-guest
sync
echo "RBD-RESTORE-GUEST-WROTE"
# Kernel command line (tests): rbdrestore.hold=N keeps the VM up N seconds;
# rbdrestore.writes=N writes N files of 1 MiB into /written, one every
# rbdrestore.every=S seconds, each synced and its sum printed, then drops the
# page cache and reads them all back from the disk.
hold=""; writes=0; every=1
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    rbdrestore.hold=*) hold="${arg#rbdrestore.hold=}" ;;
    rbdrestore.writes=*) writes="${arg#rbdrestore.writes=}" ;;
    rbdrestore.every=*) every="${arg#rbdrestore.every=}" ;;
  esac
done
if [ "$writes" -gt 0 ]; then
  mkdir -p /written
  i=1
  while [ "$i" -le "$writes" ]; do
    dd if=/dev/urandom of=/written/file$i bs=1M count=1 2>/dev/null
    sync
    echo "RBD-RESTORE-GUEST-WRITE-SUM $(sha256sum /written/file$i)"
    i=$((i + 1))
    sleep "$every"
  done
  sync
  echo 3 > /proc/sys/vm/drop_caches
  for f in $(ls /written | sort); do
    echo "RBD-RESTORE-GUEST-READBACK-SUM $(sha256sum /written/$f)"
  done
  echo "RBD-RESTORE-GUEST-WRITES-DONE"
fi
[ -n "$hold" ] && sleep "$hold"
poweroff -f
""".replace("MARKER_LINE", MARKER)


def kernel_release() -> str:
    releases = sorted(p.name for p in Path("/lib/modules").iterdir()
                      if (Path("/boot") / f"vmlinuz-{p.name}").exists())
    if not releases:
        sys.exit("build-guest: no /boot/vmlinuz-* with modules; install linux-image-amd64")
    return releases[-1]


def module_order(release: str) -> list[Path]:
    """The modules to load, dependencies first (from modinfo)."""
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or not name:
            return
        seen.add(name)
        deps = subprocess.run(["modinfo", "-k", release, "-F", "depends", name],
                              capture_output=True, text=True, check=True).stdout.strip()
        for dep in deps.split(","):
            visit(dep.strip())
        path = subprocess.run(["modinfo", "-k", release, "-n", name], capture_output=True,
                              text=True, check=True).stdout.strip()
        if path.endswith(".ko"):
            order.append(Path(path))

    for module in MODULES:
        visit(module)
    return order


def data_bytes(name: str, size: int) -> bytes:
    """Deterministic, incompressible content: SHA-256 in counter mode."""
    seed = hashlib.sha256(name.encode()).digest()
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(seed + counter.to_bytes(8, "little")).digest()
        counter += 1
    return bytes(out[:size])


BULK_FILE_BYTES = 256 << 20


def write_bulk(directory: Path, total: int) -> None:
    directory.mkdir(parents=True)
    for index in range((total + BULK_FILE_BYTES - 1) // BULK_FILE_BYTES):
        size = min(BULK_FILE_BYTES, total - index * BULK_FILE_BYTES)
        with open(directory / f"bulk{index:03d}.bin", "wb") as target:
            generator = random.Random(index)
            for _ in range(0, size, 16 << 20):
                target.write(generator.randbytes(min(16 << 20, size - target.tell())))


def write_initramfs(target: Path, release: str) -> None:
    """A busybox initramfs that loads the virtio and ext4 modules, mounts /dev/vda and
    hands over to its /sbin/init (also used by scripts/build-debian-guest.py)."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    with tempfile.TemporaryDirectory() as tmp:
        initramfs = Path(tmp) / "initramfs"
        for sub in ("bin", "proc", "sys", "dev", "newroot", "lib/modules"):
            (initramfs / sub).mkdir(parents=True)
        shutil.copy(busybox, initramfs / "bin" / "busybox")
        names = []
        for module in module_order(release):
            shutil.copy(module, initramfs / "lib" / "modules" / module.name)
            names.append(module.stem)
        (initramfs / "modules.order").write_text("\n".join(names) + "\n")
        (initramfs / "init").write_text(INITRAMFS_INIT)
        (initramfs / "init").chmod(0o755)
        files = sorted(str(p.relative_to(initramfs)) for p in initramfs.rglob("*"))
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=initramfs,
                              input="\n".join([".", *files]).encode(),
                              stdout=subprocess.PIPE, check=True)
        target.write_bytes(cpio.stdout)


def build(out: Path, disk_bytes: int = DISK_BYTES, bulk_bytes: int = 0) -> dict[str, object]:
    release = kernel_release()
    busybox = shutil.which("busybox") or "/bin/busybox"
    write_initramfs(out / "initrd.img.tmp", release)
    with tempfile.TemporaryDirectory() as tmp:
        rootfs = Path(tmp) / "rootfs"
        for sub in ("bin", "sbin", "proc", "dev", "data", "tmp"):
            (rootfs / sub).mkdir(parents=True)
        shutil.copy(busybox, rootfs / "bin" / "busybox")
        (rootfs / "sbin" / "init").write_text(ROOT_INIT)
        (rootfs / "sbin" / "init").chmod(0o755)
        sums = {}
        for name, size in DATA_FILES.items():
            content = data_bytes(name, size)
            (rootfs / name).write_bytes(content)
            sums[name] = hashlib.sha256(content).hexdigest()
        if bulk_bytes:
            write_bulk(rootfs / "srv", bulk_bytes)
        image = out / "root.img.tmp"
        image.unlink(missing_ok=True)
        # One inode per MiB: a large disk's inode tables stay small (and sparse).
        subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^metadata_csum,^64bit",
                        "-i", str(1 << 20), "-E", "root_owner=0:0,lazy_itable_init=1",
                        "-L", "guestroot", "-d", str(rootfs),
                        str(image), str(disk_bytes // 1024)], check=True)
    shutil.copy(f"/boot/vmlinuz-{release}", out / "vmlinuz")
    os.replace(out / "initrd.img.tmp", out / "initrd.img")
    os.replace(out / "root.img.tmp", out / "root.img")
    return {"kernel_release": release, "marker": MARKER, "sums": sums,
            "disk_bytes": disk_bytes, "bulk_bytes": bulk_bytes,
            "written_file": "/written-by-guest"}


def build_cached(out: Path, stamp: str, name: str, make: Callable[[], dict[str, object]]
                 ) -> dict[str, object] | None:
    """``make()`` the guest in ``out`` unless guest.json there carries ``stamp`` and the
    kernel, initramfs and disk are all present (then None); record ``stamp`` with what
    it returns."""
    manifest_path = out / "guest.json"
    if manifest_path.exists():
        existing = json.loads(manifest_path.read_text())
        if existing.get("stamp") == stamp and all(
                (out / f).exists() for f in ("vmlinuz", "initrd.img", "root.img")):
            print(f"{name}: cached in {out}")
            return None
    info = make()
    info["stamp"] = stamp
    manifest_path.write_text(json.dumps(info, indent=2) + "\n")
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--disk-size", type=int, default=DISK_BYTES, help="bytes")
    parser.add_argument("--bulk", type=int, default=0, help="bytes of data in /srv")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    stamp = hashlib.sha256(Path(__file__).read_bytes()
                           + f"{args.disk_size}:{args.bulk}".encode()).hexdigest()[:16]
    info = build_cached(out, stamp, "guest", lambda: build(out, args.disk_size, args.bulk))
    if info is None:
        return 0
    print(f"guest: built in {out} (kernel {info['kernel_release']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
