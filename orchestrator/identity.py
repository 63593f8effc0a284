"""Which artifact store a database's assets live in.

The database names its images by sha256; their files are in `ORCH_DATA_DIR/assets`. Every process
on one database (an API server, its workers, on one host or several) must use the same folder: a
worker whose data dir is another (a shared folder not mounted, a typo) stores images the API never
finds, and a new database pointed at an old data dir would see every file there as nobody's. So
the first process binds the two, with a random id in the database (`store_identity`) and in
`assets/.store-id`, and every process after checks that they agree before it starts.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Literal

from sqlmodel import Session, col, select

from orchestrator.db import Database
from orchestrator.models import Asset, StoreIdentity
from orchestrator.settings import source_of
from orchestrator.store import SHA_RE, ArtifactStore

MARKER = ".store-id"
# How many of a database's newest assets are looked for when it is bound to a data dir for the
# first time: one of them there says the folder holds its images.
RECENT_ASSETS = 20


class WrongStore(Exception):
    """The data dir is not the store this database's assets are in."""


def bind(db: Database, store: ArtifactStore) -> str:
    """The store's id, bound on first use; raises `WrongStore` when the data dir and the database
    belong to different installs. The look is made outside the write lock (a hung network mount
    must not stall every process's writes); only a first binding takes it, so that two processes
    starting together on a new install bind once."""
    marker = store.root / MARKER
    with db.session() as s:
        # The row before the marker: a binding writes its marker before it commits its row, so a
        # row seen here has its marker on disk. The other way round, a process binding between
        # the two looks made this one refuse the store as having no marker.
        row = s.get(StoreIdentity, 1)
        found = read_marker(marker)
        wrong = mismatch(s, store, found, row=row)
    if wrong is not None:
        raise WrongStore(wrong)
    if row is not None:
        return row.store_id
    with db.transaction() as s:
        row = s.get(StoreIdentity, 1)
        if row is not None:  # another process bound it meanwhile: to this folder?
            wrong = mismatch(s, store, read_marker(marker))
            if wrong is not None:
                raise WrongStore(wrong)
            return row.store_id
        store_id = found or secrets.token_hex(16)
        if found is None:
            ArtifactStore.write_atomic(marker, f"{store_id}\n".encode())
        s.add(StoreIdentity(id=1, store_id=store_id))
    return store_id


def mismatch(s: Session, store: ArtifactStore, found: str | None, *,
             row: StoreIdentity | Literal["read"] | None = "read") -> str | None:
    """Why the store (whose marker holds `found`) is not this database's, or None. `row`: the
    database's binding as read before the marker, where the caller read it."""
    bound = s.get(StoreIdentity, 1) if isinstance(row, str) else row
    where, marker = store.root, store.root / MARKER
    if bound is not None:
        if found == bound.store_id:
            return None
        if found is None:
            return (f"{where} is not where this database's images are: it has no {MARKER}, and the database's "
                    f"store is {bound.store_id}. Point {source_of('data_dir')} at the data dir the other "
                    f"processes use (a shared folder not mounted?); to move a store, copy its whole assets folder, "
                    f"{MARKER} included (if this folder does hold the images, write {bound.store_id} into {marker})")
        return (f"{where} is another database's store ({found}); this database's images are in store "
                f"{bound.store_id}. Point {source_of('data_dir')} and {source_of('database_url')} at one install")
    # Not bound yet (a new install, or one from before stores had ids): the folder is taken if it
    # holds the database's latest images, or if neither has any.
    recent = [sha for sha in s.exec(select(col(Asset.sha256)).where(col(Asset.deleted_at).is_(None))  # files swept
                                    .order_by(col(Asset.id).desc()).limit(RECENT_ASSETS))
              if SHA_RE.fullmatch(sha)]  # a malformed one (a hand-edited row) is `check`'s to name
    if recent:
        if any(store.path_for(sha).is_file() for sha in recent):
            return None
        return (f"{where} holds none of this database's latest images: point {source_of('data_dir')} at the "
                "data dir they are in (a shared folder not mounted?); start first a process that has it")
    # Images without a marker: another install's from before stores had ids, unless this database
    # named them once (its assets all deleted since, their files not swept yet). Taken, the orphan
    # sweep removed them once this install had made an image of its own.
    if any(store.root.glob("*/*.png")) and (found is not None or s.exec(select(Asset.id).limit(1)).first() is None):
        whose = f"store {found}" if found is not None else f"no {MARKER}: made by a version before stores had ids"
        return (f"{where} holds another database's images ({whose}) and this database has none: point "
                f"{source_of('database_url')} at that database, or {source_of('data_dir')} elsewhere (to start "
                "afresh, move that folder away)")
    return None


def read_marker(marker: Path) -> str | None:
    try:
        text = marker.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise WrongStore(f"cannot read {marker}: {getattr(exc, 'strerror', None) or exc}") from exc
    if not text:
        raise WrongStore(f"{marker} is empty: it should hold the id of the store (the database's store_identity)")
    return text
