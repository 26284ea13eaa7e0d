"""``rbd-restore init`` and ``rbd-restore key add|list|remove``: a repository's keys."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Annotated

import typer

from rbd_restore.cli.context import load_config
from rbd_restore.config import Config, RepositorySettings
from rbd_restore.errors import ConfigError
from rbd_restore.output import print_json
from rbd_restore.repo.layout import KeyLayout

# The repository's modules are imported where used (see cli/context.py).
if TYPE_CHECKING:
    from rbd_restore.repo.crypto import Credential
    from rbd_restore.repo.store import ObjectStore

key_app = typer.Typer(help="Add, list and remove the keys of an encrypted repository.",
                      no_args_is_help=True)
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


def _credential(cfg: Config) -> Credential:
    from rbd_restore.repo import keyring

    credential = keyring.load_credential(cfg.repository)
    if credential is None:
        raise ConfigError("set repository.key_file or repository.passphrase_file: it wraps "
                          "the repository's keys")
    return credential


def _where(cfg: Config) -> tuple[ObjectStore, KeyLayout]:
    from rbd_restore.repo.store import ObjectStore

    return ObjectStore(cfg.s3), KeyLayout(cfg.s3.prefix)


def init(ctx: typer.Context,
         plaintext: Annotated[bool, typer.Option(
             "--plaintext", help="Keep chunks and manifests readable in the bucket; manifests "
             "are still authenticated by a keyed MAC and chunk ids keyed.")] = False,
         as_json: JsonOption = False) -> None:
    """Create a repository under s3.prefix: encrypted (AES-256-GCM) unless --plaintext."""
    from rbd_restore.repo import keyring
    from rbd_restore.repo.codec import AUTHENTICATED, ENCRYPTED

    cfg = load_config(ctx)
    store, layout = _where(cfg)
    codec = keyring.init(store, layout, _credential(cfg),
                         AUTHENTICATED if plaintext else ENCRYPTED)
    summary = {"repository": f"s3://{store.bucket}/{layout.prefix}",
               "repository_id": codec.repository_id, "encryption": codec.encryption,
               "key_id": codec.current_key_id}
    if as_json:
        print_json(summary)
        return
    typer.echo(f"initialised {summary['repository']}: {codec.describe()}")


@key_app.command("add")
def key_add(ctx: typer.Context,
            key_file: Annotated[str, typer.Option(
                help="Wrap the keys for this key file instead of the configured credential "
                "(then point repository.key_file at it).")] = "",
            passphrase_file: Annotated[str, typer.Option(
                help="Wrap the keys for the passphrase in this file instead.")] = "",
            as_json: JsonOption = False) -> None:
    """Add a data key; new backups go under it, older ones stay readable. With a new
    credential, every existing key is wrapped for it too."""
    from rbd_restore.repo import keyring

    cfg = load_config(ctx)
    credential = _credential(cfg)
    store, layout = _where(cfg)
    codec = keyring.open_codec(store, layout, credential)
    new_credential = None
    if key_file or passphrase_file:
        new_credential = keyring.load_credential(RepositorySettings(key_file, passphrase_file))
    key = keyring.add_key(store, layout, codec, credential, new_credential)
    if as_json:
        print_json({"key_id": key.key_id, "created": key.created})
        return
    typer.echo(f"added key {key.key_id}: new backups go under it")


@key_app.command("list")
def key_list(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Every key object, the data key it wraps and how many backups are under it."""
    from rbd_restore.repo import keyring
    from rbd_restore.repo.repository import Repository

    cfg = load_config(ctx)
    credential = _credential(cfg)
    store, layout = _where(cfg)
    codec = keyring.open_codec(store, layout, credential)
    config = keyring.read_config(store, layout) or {}
    usage = Counter(m.key_id for m in Repository(store, cfg.s3.prefix, codec)
                    .scan_manifests().manifests)
    rows = [{"object": k.object_id, "key_id": k.key.key_id if k.key else None,
             "opens": k.key is not None,
             "current": k.key is not None and k.key.key_id == codec.current_key_id,
             "credential": k.body.get("credential", "?"), "created": k.body.get("created"),
             "host": k.body.get("host"),
             "backups": usage.get(k.key.key_id, 0) if k.key else None}
            for k in keyring.key_objects(store, layout, config, credential)]
    if as_json:
        print_json({"encryption": codec.encryption, "keys": rows})
        return
    typer.echo(f"{'OBJECT':<17} {'KEY':<17} {'CREDENTIAL':<11} {'BACKUPS':>7}  CREATED")
    for row in rows:
        key = (str(row["key_id"]) + ("*" if row["current"] else "")) if row["opens"] \
            else "(not opened)"
        typer.echo(f"{row['object']:<17} {key:<17} {row['credential']!s:<11} "
                   f"{row['backups'] if row['backups'] is not None else '-':>7}  "
                   f"{row['created']}")


@key_app.command("remove")
def key_remove(ctx: typer.Context,
               object_id: Annotated[str, typer.Argument(help="Key object id (key list).")],
               force: Annotated[bool, typer.Option(
                   "--force", help="Remove it even if backups can then no longer be read.")]
               = False) -> None:
    """Remove a key object; refused while it is the only copy of a key backups need."""
    from rbd_restore.repo import keyring
    from rbd_restore.repo.repository import Repository

    cfg = load_config(ctx)
    credential = _credential(cfg)
    store, layout = _where(cfg)
    codec = keyring.open_codec(store, layout, credential)
    usage = Counter(m.key_id for m in Repository(store, cfg.s3.prefix, codec)
                    .scan_manifests().manifests)
    keyring.remove_key(store, layout, credential, object_id, dict(usage), force)
    typer.echo(f"removed key object {object_id}")


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.add_typer(key_app, name="key")
