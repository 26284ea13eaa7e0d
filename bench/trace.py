"""Record a guest boot's block reads and replay them through python-rbd.

``record`` boots the test guest from a local raw copy under QEMU with the
``blk_co_preadv`` trace event written to a FIFO, stamping each read (offset,
length, seconds since start) as it arrives. ``replay`` issues the same reads,
in order, against any RBD image and reports how long they took: the demand
stalls a guest would see on that image, without QEMU's CPU cost.

    python -m bench.trace record [--guest DIR] OUT.json
    python -m bench.trace replay --conf CEPH_CONF POOL/IMAGE TRACE.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tests.support.vm import KERNEL_ARGS, build_guest


def record(out: Path, guest: Path | None = None) -> dict[str, Any]:
    """Boot ``guest`` (a directory with vmlinuz, initrd.img, root.img and guest.json;
    default: the small test guest) and write the reads of its boot to ``out``."""
    if guest is None:
        guest, info = build_guest()
    else:
        info = json.loads((guest / "guest.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        disk = Path(tmp) / "disk.raw"
        shutil.copyfile(guest / "root.img", disk)
        fifo = Path(tmp) / "trace.fifo"
        os.mkfifo(fifo)
        reads: list[list[float]] = []
        started = time.monotonic()

        def collect() -> None:
            with open(fifo) as lines:
                for line in lines:
                    fields = line.split()
                    if fields and fields[0] == "blk_co_preadv":
                        offset = int(fields[fields.index("offset") + 1])
                        length = int(fields[fields.index("bytes") + 1])
                        reads.append([round(time.monotonic() - started, 6), offset, length])

        reader = threading.Thread(target=collect)
        reader.start()
        subprocess.run(
            ["qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-display", "none",
             "-no-reboot", "-monitor", "none", "-serial", f"file:{Path(tmp) / 'console'}",
             "-kernel", str(guest / "vmlinuz"), "-initrd", str(guest / "initrd.img"),
             "-append", KERNEL_ARGS,
             "-drive", f"file={disk},format=raw,if=virtio",
             "-trace", f"enable=blk_co_preadv,file={fifo}"], check=True, timeout=300)
        reader.join(30)
    trace = {"guest": info["kernel_release"], "reads": reads,
             "bytes": sum(int(r[2]) for r in reads)}
    out.write_text(json.dumps(trace) + "\n")
    return trace


def replay(conf: str, spec: str, trace: dict[str, Any]) -> dict[str, float]:
    """Issue the trace's reads in order against ``spec``; seconds and read latencies."""
    import rados
    import rbd

    pool, _, name = spec.partition("/")
    cluster = rados.Rados(conffile=conf, rados_id="admin")
    cluster.connect()
    try:
        with cluster.open_ioctx(pool) as ioctx, rbd.Image(ioctx, name, read_only=True) as img:
            size = img.size()
            latencies = []
            started = time.monotonic()
            for _, offset, length in trace["reads"]:
                length = min(int(length), size - int(offset))
                if length <= 0:
                    continue
                began = time.monotonic()
                img.read(int(offset), length)
                latencies.append(time.monotonic() - began)
            total = time.monotonic() - started
    finally:
        cluster.shutdown()
    return {"seconds": total, "reads": len(latencies),
            "p99_ms": statistics.quantiles(latencies, n=100)[98] * 1000 if len(latencies) > 1
            else 0.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("out", type=Path)
    rec.add_argument("--guest", type=Path, help="guest directory (default: the small guest; "
                     "the Debian one: .cache/debian-guest)")
    rep = sub.add_parser("replay")
    rep.add_argument("--conf", required=True)
    rep.add_argument("image")
    rep.add_argument("trace", type=Path)
    args = parser.parse_args()
    if args.command == "record":
        trace = record(args.out, args.guest)
        print(f"{len(trace['reads'])} reads, {trace['bytes'] >> 20} MiB -> {args.out}")
    else:
        print(json.dumps(replay(args.conf, args.image, json.loads(args.trace.read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
