"""`GET /v1/workers`: which processes run jobs, the devices they hold and what they run."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import func
from sqlmodel import col, select

from orchestrator.api.deps import CallerDep, ServicesDep
from orchestrator.api.docs import documented
from orchestrator.api.json_body import StrictJSONRoute
from orchestrator.models import Job
from orchestrator.schemas import WorkerPublic, WorkersPublic
from orchestrator.workers import device_holders

router = APIRouter(tags=["operations"], route_class=StrictJSONRoute)


@router.get("/workers", response_model=WorkersPublic, summary="List the processes that run jobs",
            responses=documented(403, said={403: "Only the admin key may list workers; the request came with a "
                                                 "project key (`forbidden`)."}))
def list_workers(services: ServicesDep, caller: CallerDep) -> WorkersPublic:
    """The live processes that run jobs (this server, when it does, and `orchestrator worker`s
    sharing its data dir, other machines' too), with their engines, the devices they hold and their
    running jobs (admin key only). An empty list with jobs queued means nothing will run them."""
    caller.admin("listing workers")
    owners = services.scheduler.presence.workers()
    devices = device_holders(services.settings.data_dir / "locks")
    with services.db.session() as s:
        running = s.exec(select(Job.lease_owner, Job.id).where(col(Job.status) == "running")
                         .order_by(col(Job.id))).all()
        queued = s.exec(select(func.count()).select_from(Job).where(col(Job.status) == "queued")).one()
    items = []
    for live in owners:
        owner = live.owner
        host, _, rest = owner.partition(":")
        pid = rest.partition(":")[0]
        items.append(WorkerPublic(owner=owner, host=host, pid=int(pid) if pid.isdigit() else None,
                                  this_process=owner == services.scheduler.owner, this_machine=live.this_machine,
                                  engines=live.engines,
                                  devices=sorted(name for name, holder in devices.items() if holder == owner),
                                  running_jobs=[job_id for holder, job_id in running if holder == owner]))
    return WorkersPublic(items=items, runs_jobs_here=services.settings.run_jobs, queued=queued)
