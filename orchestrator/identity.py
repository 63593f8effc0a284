"""Which artifact store a database's assets live in.

The database names its images by sha256; their files are in `ORCH_DATA_DIR/assets`. Every process
on one database (an API server, its workers, on one host or several) must use the same folder: a
worker whose data dir is another (a shared folder not mounted, a typo) stores images the API never
finds, and a new database pointed at an old data dir would see every file there as nobody's. So
the first process binds the two, with a random id in the database (`store_identity`) and in
`assets/.store-id`, and every process after checks that they agree before it starts.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

from sqlmodel import Session, col, select

from orchestrator.db import Database
from orchestrator.models import Asset, StoreIdentity
from orchestrator.store import ArtifactStore

MARKER = ".store-id"


class WrongStore(Exception):
    """The data dir is not the store this database's assets are in."""


def bind(db: Database, store: ArtifactStore) -> str:
    """The store's id, bound on first use; raises `WrongStore` when the data dir and the database
    belong to different installs. One process at a time (a write transaction): two starting
    together on a new install bind once."""
    marker = store.root / MARKER
    with db.transaction() as s:
        found = read_marker(marker)
        wrong = mismatch(s, store, found)
        if wrong is not None:
            raise WrongStore(wrong)
        row = s.get(StoreIdentity, 1)
        if row is not None:
            return row.store_id
        store_id = found or secrets.token_hex(16)
        if found is None:
            _write_marker(marker, store_id)
        s.add(StoreIdentity(id=1, store_id=store_id))
    return store_id


def mismatch(s: Session, store: ArtifactStore, found: str | None) -> str | None:
    """Why the store (whose marker holds `found`) is not this database's, or None."""
    row = s.get(StoreIdentity, 1)
    where = store.root
    if row is not None:
        if found == row.store_id:
            return None
        if found is None:
            return (f"{where} is not where this database's images are: it has no {MARKER}, and the database's "
                    f"store is {row.store_id}. Point ORCH_DATA_DIR at the data dir the other processes use (a "
                    f"shared folder not mounted?); to move a store, copy its whole assets folder, {MARKER} "
                    "included")
        return (f"{where} is another database's store ({found}); this database's images are in store "
                f"{row.store_id}. Point ORCH_DATA_DIR and ORCH_DATABASE_URL at one install")
    if found is None:
        return None  # a new install, or one from before stores had ids: bound now
    no_assets = s.exec(select(col(Asset.id)).limit(1)).first() is None
    if no_assets and any(store.root.glob("*/*.png")):
        return (f"{where} holds another database's images (store {found}) and this database has none: point "
                f"ORCH_DATABASE_URL at that database or ORCH_DATA_DIR elsewhere (or remove {where / MARKER} to "
                "give its images to this database)")
    return None  # its images are this database's, or it has none: taken as this database's store


def read_marker(marker: Path) -> str | None:
    try:
        text = marker.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise WrongStore(f"cannot read {marker}: {getattr(exc, 'strerror', None) or exc}") from exc
    return text or None


def _write_marker(marker: Path, store_id: str) -> None:
    marker.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=marker.parent, prefix=".tmp-store-id-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{store_id}\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, marker)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(marker.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
