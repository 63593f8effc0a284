"""Indexes for the lists' pages and each listed job's credits

A page of a project's jobs or assets is read in id order: with `project_id` alone (or
`(project_id, status)`) in the index, every page sorted all of the project's rows first, tens of
milliseconds at 200,000 jobs. The credits shown with each listed job summed its ledger entries
through `ix_ledger_entries_job_id (job_id)`, except that SQLite took `kind` as the better index
for 50 jobs' charges and walked every capture of the ledger; with the kind, the settled flag and
the amount beside the job, it answers from the index alone.

The indexes keep their names and gain columns. On PostgreSQL, `CREATE INDEX` blocks writes to
its table while it is built (seconds for a few hundred thousand rows), as every migration is run
before the service starts.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-03 17:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = '0020'
down_revision: str | None = '0019'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (name, table, columns before, columns after)
_WIDENED = [
    ('ix_jobs_project_id', 'jobs', ['project_id'], ['project_id', 'id']),
    ('ix_jobs_project_status', 'jobs', ['project_id', 'status'], ['project_id', 'status', 'id']),
    ('ix_assets_project_id', 'assets', ['project_id'], ['project_id', 'id']),
    ('ix_ledger_entries_job_id', 'ledger_entries', ['job_id'], ['job_id', 'kind', 'settled', 'amount']),
]


def upgrade() -> None:
    for name, table, _, columns in _WIDENED:
        op.drop_index(name, table_name=table)
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name, table, columns, _ in _WIDENED:
        op.drop_index(name, table_name=table)
        op.create_index(name, table, columns)
