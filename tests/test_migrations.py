from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect
from sqlmodel import SQLModel

import orchestrator.models  # noqa: F401
from orchestrator.db import upgrade


def test_models_and_migrations_agree(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    engine = create_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), SQLModel.metadata)
    assert diff == []
    tables = set(inspect(engine).get_table_names())
    assert {"projects", "jobs", "assets", "idempotency_keys", "alembic_version"} <= tables


def upgrade_concurrently(url: str, processes: int = 3) -> None:
    """Several processes migrating one empty database at once, as services starting together do:
    every one must succeed (once, one failed with 'table projects already exists')."""
    code = "import sys; from orchestrator.db import upgrade; upgrade(sys.argv[1])"
    running = [subprocess.Popen([sys.executable, "-c", code, url], stderr=subprocess.PIPE) for _ in range(processes)]
    errors = [p.communicate(timeout=120)[1].decode()[-500:] for p in running]
    assert [p.returncode for p in running] == [0] * processes, errors
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            assert MigrationContext.configure(connection).get_current_revision() is not None
    finally:
        engine.dispose()


def test_concurrent_migrations_on_sqlite(tmp_path: Path) -> None:
    upgrade_concurrently(f"sqlite:///{tmp_path / 'orchestrator.db'}")
