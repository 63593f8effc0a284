"""Images a remote engine made, stored, whose rows never committed: adopted by recovery.

A remote job's images are made and billed once its engine answers. The runner writes them to the
store (fsynced, renamed into place), then commits their asset rows with the job's end and its
charge. A process that died in between left a job `running` whose files no row names: recovery
failed it `interrupted`, captured its estimate unreconciled, and the orphan sweep later removed its
files, so the studio paid for images it never got.

So once the images are encoded, before the first file is written, the runner commits what it is
about to store on the job's row (`Job.stored_images`, see `stored_images`): each file's sha256,
size and generation record, and what the engine said of its cost. The PNG's own record holds only
what made the image, never a job id (identical requests give byte-identical, shared files), so the
row is what ties the files to the job and its attempt.
Recovery of that attempt (`Adoption.of`) checks each file against its sha256 (a crash as they were
written leaves some, or none: then the job is recovered as before) and commits the rows the runner
would have, ends the job as the runner would have (`succeeded`; `canceled` with the images when a
cancel was asked; `failed` `interrupted` with those found whole when some were lost since) and
settles its hold once through the ledger, with the cost the engine reported. The orphan sweep
leaves every file a running job's row names (`pending`), so it cannot take them first.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, col, select

from orchestrator import webhooks
from orchestrator.clock import shared_now, utcnow
from orchestrator.errors import Canceled, Interrupted, OrchestratorError
from orchestrator.ids import new_id
from orchestrator.ledger import Ledger
from orchestrator.models import NO_LEASE, Asset, Job
from orchestrator.quota import add_assets
from orchestrator.store import SHA_RE
from tiers.base import UNKNOWN_MODEL, is_amount

log = logging.getLogger(__name__)


def stored_images(attempt: int, *, model: str | None, cost: object, cost_unread: str | None,
                  provider_request_id: str | None, cache_key: str | None,
                  images: list[dict[str, Any]]) -> dict[str, Any]:
    """`Job.stored_images` for `attempt`: `images` holds each stored file's sha256, bytes, seed,
    width, height and record, in the job's order. `cost`: the engine's reported cost, as it said it
    (the ledger judges whether it is a charge, as it does for a success)."""
    if isinstance(cost, numbers.Integral) and is_amount(cost):
        cost = int(cost)  # a numpy integer's too
    elif cost is not None and not (isinstance(cost, float) and math.isfinite(cost)):
        # Kept as its text: written as it is, JSON's null (an infinity, NaN) read as no cost
        # reported, and the estimate was captured without the flag the runner's success gives it.
        cost = repr(cost)[:40]
    return {"attempt": attempt, "model": model, "cost_millicredits": cost, "cost_unread": cost_unread,
            "provider_request_id": provider_request_id, "cache_key": cache_key, "images": images}


def pending(s: Session, shas: Collection[str]) -> set[str]:
    """Those of `shas` that a running job's stored images name: files a recovery may adopt."""
    wanted = set(shas)
    named: set[str] = set()
    # Few rows: running jobs of remote engines between their store and their end.
    for stored in s.exec(select(Job.stored_images).where(col(Job.status) == "running",
                                                         col(Job.stored_images).is_not(None))):
        for image in _listed(stored):
            sha = image.get("sha256")
            if sha in wanted:
                named.add(sha)
    return named


def _listed(stored: object) -> list[dict[str, Any]]:
    """The images a `Job.stored_images` value lists: none where it is not as the runner writes it (a
    row mended by hand, another version's), which failed every store sweep and every recovery of the job."""
    images = stored.get("images") if isinstance(stored, dict) else None
    return [image for image in images if isinstance(image, dict)] if isinstance(images, list) else []


def _sound(image: dict[str, Any]) -> bool:
    """Whether an image's fields are what the runner writes, within the asset row's columns: one that
    is not is taken for lost, not raised from the recovery's write at every sweep (the job left running)."""
    def whole(value: object, top: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and 0 < value < top

    seed = image.get("seed")
    return (isinstance(image.get("sha256"), str) and SHA_RE.fullmatch(image["sha256"]) is not None
            and isinstance(image.get("record"), dict) and whole(image.get("bytes"), 2 ** 63)
            and whole(image.get("width"), 2 ** 31) and whole(image.get("height"), 2 ** 31)
            and (seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and -2 ** 63 <= seed < 2 ** 63)))


@dataclass
class Adoption:
    """What a recovery writes for a job whose stored images it adopts (see the module)."""

    job: Job
    status: str
    error: OrchestratorError | None
    rows: list[Asset]
    stored: dict[str, Any]

    @classmethod
    def of(cls, job: Job, intact: Callable[[str], bool], *, canceled: bool = False) -> Adoption | None:
        """The adoption of the job's stored images, where its row holds them for the attempt it is
        running and at least one is in the store whole (`intact`: the store's check of a file
        against its sha256); None otherwise (recovery then goes on as it did). `canceled`: for a
        cancel of the job being written now (`JobService.cancel_orphan`), as for one asked before."""
        stored = job.stored_images
        if not isinstance(stored, dict) or stored.get("attempt") != job.attempt:
            return None
        images = _listed(stored)
        whole = [image for image in images if _sound(image) and intact(image["sha256"])]
        if not whole:
            if images:
                log.error("job %s: none of the %d images its dead process stored is in the store whole: it is "
                          "recovered without them", job.id, len(images))
            return None
        rows = [Asset(id=new_id("ast"), project_id=job.project_id, job_id=job.id, index=index, stage=job.stage,
                      parent_id=job.source_asset_id, engine=job.engine,
                      model=str(stored.get("model") or UNKNOWN_MODEL),
                      prompt=str(image["record"].get("prompt") or ""),
                      negative_prompt=str(image["record"].get("negative_prompt") or ""),
                      seed=image.get("seed"), width=int(image["width"]), height=int(image["height"]),
                      sha256=image["sha256"], record=image["record"], bytes=int(image["bytes"]))
                for index, image in enumerate(whole)]
        error: OrchestratorError | None = None
        if canceled or job.cancel_requested_at is not None:
            # As the runner ends a remote job canceled once its engine had answered: with its images.
            status = "canceled"
            error = Canceled("canceled; its worker stopped after storing the images its engine made, which the job "
                             "keeps", details={"engine": job.engine})
        elif len(whole) == len(images):
            status = "succeeded"
        else:
            status = "failed"
            error = Interrupted(
                f"the process running this job stopped after storing its images, before recording them; "
                f"{len(images) - len(whole)} of the {len(images)} were no longer in the store whole, and the job "
                "keeps the others", details={"engine": job.engine, "images_stored": len(images),
                                             "images_kept": len(whole)})
            log.error("job %s: %d of the %d images its dead process stored are missing or damaged in the store",
                      job.id, len(images) - len(whole), len(images))
        return cls(job, status, error, rows, stored)

    def values(self) -> dict[str, Any]:
        """The job row's end: as the runner's success (or end with kept images) writes it."""
        job, stored = self.job, self.stored
        error = self.error.to_dict() if self.error is not None else None
        values: dict[str, Any] = {
            "status": self.status, "finished_at": utcnow(), "error": error, **NO_LEASE,
            "progress_step": job.progress_total or 1, "progress_total": job.progress_total or 1,
            "model": stored.get("model"), "stored_images": None,
            "attempts": job.with_attempt(self.status, error),
        }
        request_id = stored.get("provider_request_id") or job.provider_request_id
        values["provider_request_id"] = (request_id or "")[:500] or None
        if stored.get("cache_key") and self.status == "succeeded":
            values["cache_key"] = stored["cache_key"]
        return values

    def write(self, s: Session, ledger: Ledger) -> list[str]:
        """The rows, the end's webhook and the charge, in the transaction whose guarded update
        ended the job (so that they commit with it, once); the adopted assets' ids."""
        stamp = shared_now()
        for row in self.rows:
            # Ids and times under the write lock, as the runner's (`runner._add_assets`): list cursors.
            row.id, row.created_at = new_id("ast"), stamp
        add_assets(s, self.rows)
        webhooks.job_ended(s, self.job.id, self.job.project_id, self.status)
        cost = self.stored.get("cost_millicredits")
        unread = self.stored.get("cost_unread")
        # What the runner's success would have charged: the engine's reported cost, else the estimate
        # (a hold of 0 on an engine that bills is captured as reported), once: the hold is settled here.
        # A cost the engine reported as no whole number is passed on as it was (or as its text,
        # `stored_images`): the ledger flags it.
        reported = cost if cost is None or isinstance(cost, (int, float)) else str(cost)[:40]
        ledger.charge_made(s, self.job, reported,  # type: ignore[arg-type]
                           note=None if self.error is None else self.error.code,
                           unread=str(unread) if unread else None)
        return [row.id for row in self.rows]
