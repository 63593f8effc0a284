"""What recovery makes of the images a dead attempt stored (`orchestrator.adopt.Adoption`), without a service."""

from __future__ import annotations

from sqlalchemy.pool import StaticPool
from sqlmodel import Session, SQLModel, create_engine

from orchestrator.adopt import Adoption, pending, stored_images
from orchestrator.clock import utcnow
from orchestrator.models import Job


def stored_job(images: int, *, stored_attempt: int = 2, canceled: bool = False) -> Job:
    record = {"prompt": "a lighthouse", "negative_prompt": "", "seed": 5, "width": 8, "height": 8}
    return Job(id="job_x", project_id="prj_x", stage="bridge", engine="fake-paid", params={}, estimated=10_000,
               attempt=2, status="running", source_asset_id="ast_src",
               cancel_requested_at=utcnow() if canceled else None,
               stored_images=stored_images(
                   stored_attempt, model="fake-1", cost=7000, cost_unread=None, provider_request_id="fake-1",
                   cache_key=None, images=[{"sha256": f"{i:064x}", "bytes": 100 + i, "seed": 5, "width": 8,
                                            "height": 8, "record": record} for i in range(images)]))


def test_an_adoption_keeps_the_files_found_whole_and_says_how_the_job_ends() -> None:
    job = stored_job(3)
    whole = Adoption.of(job, lambda sha: True)
    assert whole is not None and whole.status == "succeeded" and whole.error is None
    assert [(row.index, row.sha256, row.parent_id, row.model) for row in whole.rows] == [
        (i, f"{i:064x}", "ast_src", "fake-1") for i in range(3)]
    assert whole.values()["stored_images"] is None and whole.values()["attempts"][-1]["status"] == "succeeded"

    # One file lost from the store since: the job keeps the others, and says it was interrupted.
    part = Adoption.of(job, lambda sha: sha != f"{1:064x}")
    assert part is not None and part.status == "failed"
    assert part.error is not None and part.error.code == "interrupted"
    assert part.error.details == {"engine": "fake-paid", "images_stored": 3, "images_kept": 2}
    assert [(row.index, row.sha256) for row in part.rows] == [(0, f"{0:064x}"), (1, f"{2:064x}")]

    # A cancel asked before the process died: ended canceled, with the images made and paid for.
    canceled = Adoption.of(stored_job(1, canceled=True), lambda sha: True)
    assert canceled is not None and canceled.status == "canceled" and len(canceled.rows) == 1


def test_nothing_is_adopted_of_another_attempt_or_of_files_none_of_which_is_whole() -> None:
    assert Adoption.of(stored_job(1, stored_attempt=1), lambda sha: True) is None  # an earlier attempt's
    assert Adoption.of(stored_job(2), lambda sha: False) is None
    job = stored_job(1)
    job.stored_images = {**(job.stored_images or {}), "images": [{"sha256": "../../etc/passwd"}]}
    assert Adoption.of(job, lambda sha: True) is None  # a row mended by hand names no file


def test_a_garbled_stored_image_is_not_adopted_and_does_not_stop_recovery_or_the_sweep() -> None:
    """A row mended by hand, or written by another version: an image whose fields are not what the
    runner writes is not whole (the others are adopted), and nothing raises. Raised, recovery of the
    job failed at every sweep and left it running with its hold, and one such row failed every
    store sweep and `orchestrator check` (`pending`)."""
    good = stored_job(1).stored_images
    assert good is not None
    image = good["images"][0]
    garbled: list[dict[str, object]] = [
        {k: v for k, v in image.items() if k != "width"}, {**image, "record": None}, {**image, "record": "x"},
        {**image, "bytes": "many"}, {**image, "height": -8}, {**image, "width": True}, {**image, "seed": 2 ** 70},
        {**image, "width": 2 ** 40}, {**image, "seed": "5"},
    ]
    for bad in garbled:
        job = stored_job(1)
        other = {**image, "sha256": f"{9:064x}"}
        job.stored_images = {**good, "images": [bad, other]}
        adoption = Adoption.of(job, lambda sha: True)
        assert adoption is not None and [row.sha256 for row in adoption.rows] == [f"{9:064x}"], bad
        assert adoption.status == "failed"
        job.stored_images = {**good, "images": [bad]}
        assert Adoption.of(job, lambda sha: True) is None, bad
    for images in (5, "ab", {"sha256": f"{0:064x}"}, None):
        job = stored_job(1)
        job.stored_images = {**good, "images": images}
        assert Adoption.of(job, lambda sha: True) is None
    job = stored_job(1)
    job.stored_images = ["not", "a", "dict"]  # type: ignore[assignment]
    assert Adoption.of(job, lambda sha: True) is None


def test_the_sweep_s_look_at_running_jobs_passes_over_a_garbled_row() -> None:
    engine = create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
    SQLModel.metadata.create_all(engine)
    try:
        with Session(engine) as s:
            named = stored_job(1)
            for i, garbled in enumerate(([1, 2], {"images": 5}, {"images": "ab"}, {"images": [None, 3]})):
                job = stored_job(1)
                job.id, job.stored_images = f"job_{i}", garbled  # type: ignore[assignment]
                s.add(job)
            s.add(named)
            s.commit()
            assert pending(s, [f"{0:064x}", f"{1:064x}"]) == {f"{0:064x}"}
    finally:
        engine.dispose()
