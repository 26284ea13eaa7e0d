"""How the backed-up image was laid out in RADOS, so a restore can lay it out alike.

``rbd export --export-format 2`` carries an image's object size, features and
striping for the same reason: an image restored with the client's defaults can
differ from its source in ways an operator relies on. Its data can land in the
replicated pool instead of the erasure-coded data pool it lived in (1.5x the
raw space becomes 3x), lose ``journaling`` (journal-based mirroring of the pool
then skips it), or gain ``exclusive-lock`` where a multi-attach volume had it
off. ``metadata`` is the image's ``rbd image-meta`` (QoS limits, cache settings
as ``conf_*`` keys), rbd-restore's own keys left out.

This module is the manifest's ``layout`` field (docs/format.md): its parsing
and rules. Applying it to a new image is Ceph's side (rbd_restore.image_layout).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

# The features a new image can be created with, by librbd's names for them
# (`rbd info`). The others (data-pool, operations, migrating, non-primary) follow
# from how the image is created or used, not from a choice.
CREATABLE_FEATURES = ("layering", "striping", "exclusive-lock", "object-map", "fast-diff",
                      "deep-flatten", "journaling")
MIN_ORDER, MAX_ORDER = 12, 25  # librbd's object sizes: 4 KiB to 32 MiB
POOL_NAME = re.compile(r"^[^/@\s]{1,256}$")
METADATA_MAX_BYTES = 64 << 10
OWN_METADATA_PREFIX = "rbd-restore."


@dataclass(frozen=True)
class Layout:
    order: int  # objects of 2**order bytes
    features: tuple[str, ...]
    stripe_unit: int
    stripe_count: int
    data_pool: str = ""  # "": the data lives in the image's own pool
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def object_size(self) -> int:
        return 1 << self.order

    @property
    def striped(self) -> bool:
        """Striping other than librbd's default (one object at a time, whole)."""
        return self.stripe_count != 1 or self.stripe_unit != self.object_size

    def as_json(self) -> dict[str, Any]:
        return {"order": self.order, "features": list(self.features),
                "stripe_unit": self.stripe_unit, "stripe_count": self.stripe_count,
                "data_pool": self.data_pool, "metadata": dict(self.metadata)}


def parse_layout(body: Any) -> Layout:
    """A layout as stored; ``ValueError`` for anything a restore must not apply."""
    if not isinstance(body, dict):
        raise ValueError("layout is not an object")
    order, unit, count = (_integer(body, name) for name in ("order", "stripe_unit",
                                                             "stripe_count"))
    if not MIN_ORDER <= order <= MAX_ORDER:
        raise ValueError(f"layout.order {order} is outside {MIN_ORDER}-{MAX_ORDER}")
    if unit <= 0 or (1 << order) % unit or not 1 <= count <= 1 << 16:
        raise ValueError("layout.stripe_unit must divide the object size and "
                         "layout.stripe_count be 1 to 65536")
    features = body.get("features")
    if not isinstance(features, list) or any(f not in CREATABLE_FEATURES for f in features):
        raise ValueError(f"layout.features holds a feature other than "
                         f"{', '.join(CREATABLE_FEATURES)}")
    data_pool = body.get("data_pool", "")
    if not isinstance(data_pool, str) or (data_pool and not POOL_NAME.match(data_pool)):
        raise ValueError("layout.data_pool is not a pool name")
    metadata = body.get("metadata", {})
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and 0 < len(k) <= 256 and isinstance(v, str)
            for k, v in metadata.items()):
        raise ValueError("layout.metadata is not an object of strings")
    if not metadata_fits(metadata):
        raise ValueError("layout.metadata exceeds 64 KiB")
    return Layout(order, tuple(dict.fromkeys(features)), unit, count, data_pool,
                  dict(metadata))


def _integer(body: dict[str, Any], name: str) -> int:
    value = body.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"layout.{name} is not an integer")
    return value


def metadata_fits(metadata: dict[str, str]) -> bool:
    """Whether image-meta is within the manifest's bound, measured as the manifest
    stores it (JSON, non-ASCII escaped: a character can take six bytes)."""
    return len(json.dumps(metadata)) <= METADATA_MAX_BYTES
