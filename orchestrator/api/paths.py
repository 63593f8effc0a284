"""Path parameters as the routes name them, each described once for the API document.

Another project's resource is answered to a project key exactly as a missing one is (404), and
the ids of a project's own things say so."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path

ProjectId = Annotated[str, Path(description=(
    "The project's id (`prj_...`); a project key reaches only its own project, and any other id is a 404."))]
JobId = Annotated[str, Path(description=(
    "The job's id (`job_...`), as the request that made it answered; another project's job is a 404 for a "
    "project key."))]
AssetId = Annotated[str, Path(description=(
    "The asset's id (`ast_...`), as its job's `assets` lists it; another project's asset is a 404 for a "
    "project key."))]
EntryId = Annotated[str, Path(description=(
    "The ledger entry's id (digits, as the ledger lists it): the `unreconciled` capture to settle."))]
KeyId = Annotated[str, Path(description="The key's id (`key_...`), in the project of the path.")]
PolicyName = Annotated[str, Path(description="A loaded policy's name, as `GET /v1/policies` lists it.")]
DeliveryId = Annotated[str, Path(description=(
    "The webhook delivery's id (`whd_...`): the `webhook-id` header its receiver got; another project's is a 404 "
    "for a project key."))]
