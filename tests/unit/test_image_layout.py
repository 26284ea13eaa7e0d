"""The manifest's ``layout`` field: kept through a round trip, refused when off."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import pytest

from rbd_restore.errors import IntegrityError
from rbd_restore.repo import manifest
from rbd_restore.repo.image_layout import Layout, metadata_fits, parse_layout
from rbd_restore.repo.repository import new_backup_id

LAYOUT = Layout(order=23, features=("layering", "exclusive-lock", "journaling"),
                stripe_unit=1 << 20, stripe_count=4, data_pool="ec-data",
                metadata={"conf_rbd_qos_iops_limit": "5000"})


def sample(layout: Layout | None) -> manifest.Manifest:
    return manifest.Manifest(
        backup_id=new_backup_id(), created="2026-12-07T00:00:00+00:00",
        source=manifest.Source("fsid", "volumes", "vm1", "1234abcd", "rbd-restore.x"),
        image_size=4 << 20, chunk_size=4 << 20, chunks=[None], layout=layout)


def test_a_layout_survives_the_manifest_and_an_old_manifest_has_none() -> None:
    kept = manifest.from_json(manifest.to_json(sample(LAYOUT)))
    assert kept.layout == LAYOUT and kept.layout.striped
    assert kept.layout.object_size == 8 << 20
    old = manifest.to_json(sample(None))
    assert b'"layout"' not in old and manifest.from_json(old).layout is None


@pytest.mark.parametrize("change, message", [
    ({"order": 11}, "outside 12-25"), ({"order": True}, "not an integer"),
    ({"stripe_unit": 3 << 20}, "must divide the object size"),
    ({"stripe_count": 0}, "be 1 to 65536"),
    ({"features": ["layering", "operations"]}, "a feature other than"),
    ({"data_pool": "a/b"}, "not a pool name"),
    ({"metadata": {"k": 1}}, "not an object of strings"),
    ({"metadata": {"k": "v" * (65 << 10)}}, "exceeds 64 KiB"),
])
def test_a_layout_a_restore_must_not_apply_is_refused(change: dict[str, Any],
                                                      message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_layout({**LAYOUT.as_json(), **change})
    body = json.loads(manifest.to_json(sample(LAYOUT)))
    body["layout"].update(change)
    body.pop("checksum")  # re-made: only the layout's own rules can refuse it
    body["checksum"] = "sha256:" + hashlib.sha256(manifest._canonical(body)).hexdigest()
    with pytest.raises(IntegrityError, match=message):
        manifest.from_json(json.dumps(body).encode())


def test_default_striping_is_not_striped() -> None:
    assert not dataclasses.replace(LAYOUT, stripe_unit=8 << 20, stripe_count=1).striped


def test_metadata_is_measured_as_the_manifest_stores_it() -> None:
    """The backup measured it with repr(), where a non-ASCII character takes one byte
    and JSON six: image-meta under the bound there made a manifest the reader
    refuses."""
    wide = {"note": "é" * 20_000}  # 20 KB by repr, 120 KB as stored
    assert len(repr(wide)) < 64 << 10 and not metadata_fits(wide)
    assert metadata_fits({"note": "e" * 20_000})
