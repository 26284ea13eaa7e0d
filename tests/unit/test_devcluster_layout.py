from __future__ import annotations

import base64
import os
import struct
from pathlib import Path

from rbd_restore.devcluster.layout import (
    ClusterState,
    Layout,
    ceph_conf_text,
    cephx_key,
    keyring_text,
)
from rbd_restore.devcluster.processes import ProcessRecord, is_running, start_ticks_of


def test_cephx_key_has_ceph_encoding() -> None:
    raw = base64.b64decode(cephx_key())
    kind, _, _, length = struct.unpack("<HIIH", raw[:12])
    assert (kind, length, len(raw)) == (1, 16, 28)
    assert cephx_key() != cephx_key()


def test_ports_are_distinct_and_monitor_outside_bind_range() -> None:
    state = ClusterState.fresh(1 << 30, "memstore")
    bind = range(state.messenger_port_min, state.messenger_port_max + 1)
    assert state.mon_port not in bind
    assert state.rgw_port not in bind
    assert state.mon_port != state.rgw_port


def test_conf_binds_loopback_only(tmp_path: Path) -> None:
    state = ClusterState.fresh(1 << 30, "memstore")
    text = ceph_conf_text(Layout(tmp_path), state)
    assert f"mon host = v2:127.0.0.1:{state.mon_port}" in text
    assert f"beast endpoint=127.0.0.1:{state.rgw_port}" in text
    assert "public addr = 127.0.0.1" in text
    assert "memstore device bytes = 1073741824" in text


def test_keyring_text_lists_caps() -> None:
    text = keyring_text({"client.x": ("KEY", {"mon": "allow r"})})
    assert text == '[client.x]\n\tkey = KEY\n\tcaps mon = "allow r"\n'


def test_process_record_rejects_garbage_and_detects_pid_reuse() -> None:
    assert ProcessRecord.parse("12 x") is None
    assert ProcessRecord.parse("") is None
    me = os.getpid()
    ticks = start_ticks_of(me)
    assert ticks is not None
    assert is_running(ProcessRecord(me, ticks))
    assert not is_running(ProcessRecord(me, ticks + 1))
