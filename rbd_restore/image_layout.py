"""An RBD image's layout read for its backup, and given to the image a restore creates
(the manifest's ``layout``: rbd_restore.repo.image_layout says why it matters).

A backup written before layouts were kept restores with the client's defaults,
as it always did. A data pool the destination cluster does not have (a restore
at another site) is left out with a warning: the data then lives in the image's
pool, as ``rbd import`` would put it.

An instant restore is never staged striped: measured, librbd 16.2.15's
import-only migration (its own raw file source as much as ours) relocates into
an image striped 1 MiB x 4 with wrong bytes, while reads before the relocation
are right. Striping only places the bytes, so it is dropped there (with a
warning), and a client's ``rbd_default_stripe_*`` is overridden.
"""

from __future__ import annotations

import logging
from typing import Any

from rbd_restore.ceph import Cluster
from rbd_restore.repo.image_layout import OWN_METADATA_PREFIX, Layout, metadata_fits

log = logging.getLogger(__name__)

# An instant restore needs these whatever its source had: librbd's import-only
# migration wants layering, and the staged image's exclusive lock is what forwards
# the relocation to the VM's librbd and lets the boot set be copied in first.
STAGING_FEATURES = ("layering", "exclusive-lock")
DEFAULT_ORDER = 22  # librbd's rbd_default_order: 4 MiB objects


def _feature_bits() -> dict[str, int]:
    import rbd

    return {"layering": rbd.RBD_FEATURE_LAYERING, "striping": rbd.RBD_FEATURE_STRIPINGV2,
            "exclusive-lock": rbd.RBD_FEATURE_EXCLUSIVE_LOCK,
            "object-map": rbd.RBD_FEATURE_OBJECT_MAP, "fast-diff": rbd.RBD_FEATURE_FAST_DIFF,
            "deep-flatten": rbd.RBD_FEATURE_DEEP_FLATTEN,
            "journaling": rbd.RBD_FEATURE_JOURNALING}


def read_layout(cluster: Cluster, image: Any) -> Layout:
    """The layout of an open image, its image-meta included (not rbd-restore's own)."""
    import rbd

    bits = int(image.features())
    features = tuple(name for name, bit in _feature_bits().items() if bits & bit)
    data_pool = ""  # without the feature, data_pool_id() is the image's own pool
    if bits & rbd.RBD_FEATURE_DATA_POOL:
        data_pool = str(cluster.rados.pool_reverse_lookup(int(image.data_pool_id())))
    metadata = {str(k): str(v) for k, v in image.metadata_list()
                if not str(k).startswith(OWN_METADATA_PREFIX)}
    if not metadata_fits(metadata):
        log.warning("the image-meta of %s exceeds 64 KiB and is not kept with its backup",
                    image.get_name())
        metadata = {}
    return Layout(int(image.stat()["order"]), features, int(image.stripe_unit()),
                  int(image.stripe_count()), data_pool, metadata)


def default_object_size(cluster: Cluster) -> int:
    """The object size of images this client creates when not told otherwise."""
    order = str(cluster.rados.conf_get("rbd_default_order") or "")  # None: not an option
    return 1 << (int(order) if order.isdigit() else DEFAULT_ORDER)


def create_options(cluster: Cluster, layout: Layout | None, staging: bool) -> dict[str, Any]:
    """Keyword arguments of ``RBD.create`` (or, ``staging``, of
    ``migration_prepare_import``) that give a new image ``layout``; without one, the
    client's defaults (a staging image is never striped, whatever they say)."""
    if layout is None:
        if not staging:
            return {}
        order = default_object_size(cluster).bit_length() - 1
        return {"order": order, "stripe_unit": 1 << order, "stripe_count": 1}
    wanted = set(layout.features) | (set(STAGING_FEATURES) if staging else set())
    bits = _feature_bits()
    # librbd sets striping itself when the stripe settings are not its defaults (and
    # drops it when they are).
    options: dict[str, Any] = {
        "order": layout.order,
        "features": sum(bits[name] for name in wanted if name != "striping"),
        "stripe_unit": layout.stripe_unit, "stripe_count": layout.stripe_count}
    if layout.striped and staging:
        options.update(stripe_unit=layout.object_size, stripe_count=1)  # see the module
        log.warning("the backup's striping (stripe unit %d, count %d) is not kept by an "
                    "instant restore: librbd relocates into striped images wrongly; "
                    "restore with --mode full to keep it", layout.stripe_unit,
                    layout.stripe_count)
    if layout.data_pool:
        if cluster.rados.pool_exists(layout.data_pool):
            options["data_pool"] = layout.data_pool
        else:
            log.warning("the backup's data pool %s does not exist here: the restored "
                        "image keeps its data in its own pool", layout.data_pool)
    return options


def apply_metadata(image: Any, layout: Layout | None) -> None:
    """Give an open image the source's image-meta."""
    for key, value in (layout.metadata if layout is not None else {}).items():
        image.metadata_set(key, value)
