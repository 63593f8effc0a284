"""`orchestrator check`: whether every asset's PNG is in the store, byte for byte.

Read-only, for an operator after a restore from backup, a disk error or a move of the data dir:
an asset whose file is missing, or whose bytes no longer hash to the sha256 its row records,
cannot be served; the files no asset names are counted (the service's own sweep removes them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlmodel import col, select

from orchestrator.db import Database
from orchestrator.errors import NotFound
from orchestrator.models import Asset
from orchestrator.store import ORPHAN_BATCH, ArtifactStore, stored_sha

PAGE = 1000
CHUNK = 1 << 20


@dataclass
class StoreReport:
    assets: int = 0
    files: int = 0  # distinct files the assets name (identical images share one)
    missing: list[str] = field(default_factory=list)  # asset ids
    damaged: list[str] = field(default_factory=list)  # asset ids
    unnamed: int = 0  # files in the store no asset names
    hashed: bool = True

    @property
    def ok(self) -> bool:
        return not self.missing and not self.damaged


def check_store(db: Database, store: ArtifactStore, *, hashes: bool = True) -> StoreReport:
    report = StoreReport(hashed=hashes)
    verdicts: dict[str, str | None] = {}  # sha -> None (sound), "missing" or "damaged"
    for page in _asset_pages(db):
        for asset_id, sha in page:
            report.assets += 1
            if sha not in verdicts:
                verdicts[sha] = _verdict(store, sha, hashes)
                report.files += 1
            verdict = verdicts[sha]
            if verdict == "missing":
                report.missing.append(asset_id)
            elif verdict == "damaged":
                report.damaged.append(asset_id)
        if len(verdicts) > 10 * PAGE:
            # Assets are paged by id, and identical images are rare: forgetting old verdicts only
            # costs a second look at a file two far-apart assets share.
            verdicts.clear()
    report.unnamed = _unnamed(db, store)
    return report


def _asset_pages(db: Database) -> Iterator[list[tuple[str, str]]]:
    after = ""
    while True:
        with db.session() as s:
            rows = list(s.exec(select(Asset.id, Asset.sha256).where(col(Asset.id) > after)
                               .order_by(col(Asset.id)).limit(PAGE)).all())
        if not rows:
            return
        yield [(asset_id, sha) for asset_id, sha in rows]
        after = rows[-1][0]


def _verdict(store: ArtifactStore, sha: str, hashes: bool) -> str | None:
    try:
        path = store.path_for(sha)
    except NotFound:  # a row whose sha256 is not one: nothing can be served for it
        return "damaged"
    if not path.is_file():
        return "missing"
    if hashes and _sha256(path) != sha:
        return "damaged"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _unnamed(db: Database, store: ArtifactStore) -> int:
    files = [sha for path in store.root.glob("*/*.png")
             if (sha := stored_sha(path)) is not None and not path.name.startswith(".") and path.is_file()]
    unnamed = 0
    for start in range(0, len(files), ORPHAN_BATCH):
        batch = files[start:start + ORPHAN_BATCH]
        with db.session() as s:
            named = set(s.exec(select(Asset.sha256).where(col(Asset.sha256).in_(batch))))
        unnamed += sum(1 for sha in batch if sha not in named)
    return unnamed
