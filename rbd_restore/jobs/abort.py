"""What the image header says of a job, and aborting one (``rbd-restore abort``)."""

from __future__ import annotations

from dataclasses import dataclass

from rbd_restore import lazy_clone
from rbd_restore.ceph import Cluster, image_exists
from rbd_restore.errors import NotFoundError, UnavailableError, UserError
from rbd_restore.fetcher.client import ControlClient
from rbd_restore.jobs.lease import lease, runner_cookie
from rbd_restore.jobs.store import ACTIVE, JobRecord, JobStore
from rbd_restore.pool_room import full_pools, refuse_if_full


def pool_full_note(record: JobRecord, reason: str) -> str:
    return (f"pool {record.pool} is full ({reason}); the relocation of {record.spec} and "
            "the writes of a VM using it wait until the pool has room")


def reconcile(cluster: Cluster, record: JobRecord,
              full: dict[str, str] | None = None) -> tuple[JobRecord, str]:
    """The header's migration state wins over a record that a dead runner left behind;
    also returns that state (``""`` when there is none to show). ``full``: the pools
    Ceph takes no writes into (:func:`full_pools`), when the caller asked already."""
    if record.state not in ACTIVE:
        return record, ""
    if full is None:
        full = full_pools(cluster, {record.pool})
    if record.pool in full:
        # librbd reads the migration state through a read-write open of the image,
        # which registers a watch: a write, and on a full pool it waits for room.
        return record.with_(error=pool_full_note(record, full[record.pool])), ""
    try:
        with cluster.ioctx(record.pool) as ioctx:
            migration = lazy_clone.state(ioctx, record.image)
    except NotFoundError:
        if record.state == "preparing":  # not made yet, or never: a runner settles it
            return record, ""
        if record.image_id:
            with cluster.ioctx(record.pool) as ioctx:
                renamed = lazy_clone.current_name(ioctx, record.image_id)
            if renamed is not None:  # renamed (by Cinder, say): the job follows it
                return reconcile(cluster, record.with_(image=renamed))
        return record.with_(state="aborted", error="the image no longer exists"), ""
    except UnavailableError as exc:  # say so, and still show every other job
        error = f"{record.error}; now: {exc.message}" if record.error else exc.message
        return record.with_(error=error), ""
    if migration is None:
        return record.with_(state="committed", progress=1.0), ""
    if migration.state == "executed":
        return record.with_(progress=1.0), "executed"
    return record, migration.state


@dataclass(frozen=True)
class Aborted:
    record: JobRecord
    put_back: str  # the replaced image that is the image again, if any
    session_warning: str  # why the session could not be closed, if it could not


def abort_job(cluster: Cluster, control: ControlClient, job_id: str) -> Aborted:
    """Remove the job's image and every write made to it, refused while anything has
    it open; an image the restore replaced takes its name back; the session closes."""
    import rbd

    store = JobStore(cluster)
    stored = store.get(job_id)
    refuse_if_full(cluster, stored.pool, f"aborting job {job_id}")
    record, _ = reconcile(cluster, stored, {})
    if record.state not in ACTIVE:
        raise UserError(f"job {job_id} is {record.state}; only restores that are not "
                        "committed yet can be aborted")
    put_back = ""
    with cluster.ioctx(record.pool) as ioctx:
        if record.state == "preparing":
            # A preparing job whose restore command still runs holds its lease.
            with lease(ioctx, record.id, runner_cookie(), "rbd-restore abort"):
                pass
        if image_exists(ioctx, record.image):
            lazy_clone.abort(ioctx, record.image)
        if record.replaces and image_exists(ioctx, record.replaces):
            rbd.RBD().rename(ioctx, record.replaces, record.image)
            put_back = record.replaces
    store.save(record.with_(state="aborted", error="aborted by the operator", replaces=""))
    warning = ""
    if record.session_id:
        try:
            control.close(record.session_id)
        except NotFoundError:
            pass  # closed already
        except UserError as exc:
            warning = f"session {record.session_id} not closed: {exc.message}"
    return Aborted(record, put_back, warning)
