"""`orchestrator check`: whether every asset's PNG is in the store, byte for byte.

For an operator after a restore from backup, a disk error or a move of the data dir: an asset
whose file is missing, unreadable, or whose bytes no longer hash to the sha256 its row records
cannot be served; the files no asset names are counted (the service's own sweep removes them).

Read-only, on a read-only mount too: the database is opened read-only (SQLite with `mode=ro`,
PostgreSQL in read-only transactions) and nothing is created in the data dir.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import create_engine
from sqlalchemy.engine import Engine, make_url
from sqlmodel import Session, col, select

from orchestrator.db import postgres_connect_args
from orchestrator.errors import NotFound
from orchestrator.models import Asset
from orchestrator.store import ORPHAN_BATCH, ArtifactStore, stored_sha

PAGE = 1000
CHUNK = 1 << 20
# Verdicts kept for files several assets share (identical images): bounded, as assets are paged.
REMEMBERED = 10 * PAGE


class CannotCheck(Exception):
    """Nothing could be checked: no database or no store where the settings point."""


@dataclass
class StoreReport:
    assets: int = 0
    reads: int = 0  # files looked at (a file identical images share is looked at once, mostly)
    missing: list[str] = field(default_factory=list)  # asset ids, as for the lists below
    damaged: list[str] = field(default_factory=list)  # bytes that do not hash to the row's sha256
    unreadable: list[str] = field(default_factory=list)  # the file is there, reading it failed
    malformed: list[str] = field(default_factory=list)  # the row's sha256 is not one
    unnamed: int = 0  # files in the store no asset names
    hashed: bool = True

    @property
    def ok(self) -> bool:
        return not (self.missing or self.damaged or self.unreadable or self.malformed)


def read_only_engine(url: str) -> Engine:
    """An engine that cannot write, on a database that must exist already."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = Path(parsed.database or "")
        if not path.is_file():  # connecting would make an empty one
            raise CannotCheck(f"no database at {path} (is ORCH_DATA_DIR or ORCH_DATABASE_URL right?)")
        # Not the service's set-up (WAL, a busy timeout for writers): that would change a restored file.
        return create_engine(f"sqlite:///file:{quote(str(path.resolve()))}?mode=ro&uri=true")
    args = postgres_connect_args(url)
    args["options"] += " -c default_transaction_read_only=on"
    return create_engine(url, connect_args=args)


def open_store(assets_dir: Path) -> ArtifactStore:
    if not assets_dir.is_dir():  # ArtifactStore would make it, and every asset would be "missing"
        raise CannotCheck(f"no asset store at {assets_dir} (is ORCH_DATA_DIR right?)")
    return ArtifactStore(assets_dir)


def check_store(engine: Engine, store: ArtifactStore, *, hashes: bool = True) -> StoreReport:
    report = StoreReport(hashed=hashes)
    verdicts: dict[str, str | None] = {}  # sha -> None (sound) or the report's list it goes in
    for page in _asset_pages(engine):
        for asset_id, sha in page:
            report.assets += 1
            if sha not in verdicts:
                if len(verdicts) >= REMEMBERED:
                    verdicts.clear()
                verdicts[sha] = _verdict(store, sha, hashes)
                report.reads += 1
            verdict = verdicts[sha]
            if verdict is not None:
                getattr(report, verdict).append(asset_id)
    report.unnamed = _unnamed(engine, store)
    return report


def _asset_pages(engine: Engine) -> Iterator[list[tuple[str, str]]]:
    after = ""
    while True:
        with Session(engine) as s:
            rows = list(s.exec(select(Asset.id, Asset.sha256).where(col(Asset.id) > after)
                               .order_by(col(Asset.id)).limit(PAGE)).all())
        if not rows:
            return
        yield [(asset_id, sha) for asset_id, sha in rows]
        after = rows[-1][0]


def _verdict(store: ArtifactStore, sha: str, hashes: bool) -> str | None:
    try:
        path = store.path_for(sha)
    except NotFound:
        return "malformed"
    try:
        if not path.is_file():
            return "missing"
        if hashes and _sha256(path) != sha:
            return "damaged"
    except OSError:  # a disk error, a permission: this file, not the whole check
        return "unreadable"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _unnamed(engine: Engine, store: ArtifactStore) -> int:
    unnamed = 0
    for batch in _batches(sha for path in store.root.glob("*/*.png")
                          if not path.name.startswith(".") and (sha := stored_sha(path)) is not None):
        with Session(engine) as s:
            named = set(s.exec(select(Asset.sha256).where(col(Asset.sha256).in_(batch))))
        unnamed += sum(1 for sha in batch if sha not in named)
    return unnamed


def _batches(items: Iterable[Any]) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == ORPHAN_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch
