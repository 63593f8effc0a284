"""`orchestrator worker`: a process that runs queued jobs and serves no HTTP.

Run one per GPU (pin it with `CUDA_VISIBLE_DEVICES`) beside API servers started with
`ORCH_RUN_JOBS=false` (or `serve --no-jobs`), all on one database and one `ORCH_DATA_DIR`. A worker
is the scheduler of `serve` without the web server: it finds jobs any process queued, keeps its
model warm, runs local jobs only while it holds its device (see `orchestrator.workers`), renews its
leases, recovers the jobs of workers that died, reloads the policy files on SIGHUP, and stops on
SIGTERM or SIGINT as `serve` does (paid requests already out are given ORCH_STOP_GRACE to answer;
other running jobs are left for recovery): status 0 after SIGTERM, a clean stop for a supervisor,
and 130 with one line, `interrupted`, after Ctrl-C, as every command ends on it.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from orchestrator.db import shown_url
from orchestrator.services import Services, Stopped
from orchestrator.settings import Settings

log = logging.getLogger(__name__)


async def run_worker(settings: Settings, stop: asyncio.Event | None = None) -> Stopped:
    """Run jobs until `stop` is set, or until SIGTERM or SIGINT when no event is given."""
    loop = asyncio.get_running_loop()
    built: list[Services] = []
    received: list[int] = []
    if stop is None:
        stop = asyncio.Event()
        signalled = stop

        def on_stop(sig: int) -> None:
            received.append(sig)
            if signalled.is_set() and built:
                built[0].scheduler.hurry()  # a second signal: stop waiting for paid requests to answer
            signalled.set()

        def on_hup() -> None:
            if built:
                built[0].reload_policies_soon("SIGHUP")

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_stop, sig)
        # As `serve` takes it (a HUP sent to every unit must not end the workers, as its default
        # does), from before the services are built.
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    services = await asyncio.to_thread(Services.build, settings)
    built.append(services)
    services.bus.bind(loop)
    try:
        await services.start()
        url = shown_url(settings.resolved_database_url)
        log.info("worker %s runs jobs from %s", services.scheduler.owner, url)
        services.log_engine_notes()
        await stop.wait()
        log.info("worker %s stopping", services.scheduler.owner)
    finally:
        await services.aclose()
    return Stopped(received[0] if received else None, services.device_busy)
