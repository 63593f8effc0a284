"""An image's generation record (its asset row, its PNG's JSON chunk and A1111 `parameters`) says
what the engine used: a parameter its metadata reports wins, one it reports as None is left out,
and an engine silent about a negative prompt it cannot take did not use the job's."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from PIL import Image
from sqlmodel import col, select

from orchestrator.ids import new_id
from orchestrator.models import Asset, Job, Project
from orchestrator.services import Services
from orchestrator.settings import Settings
from tests.fakes import FakeServerEngine
from tiers.base import CancelToken, Capabilities, EngineContext, PriceTable, Progress, RenderRequest, RenderResult

ENGINES = "says=tests.api.test_records:factory,silent=tests.api.test_records:silent_factory"
ASKED: dict[str, Any] = {"stage": "bridge", "prompt": "a lighthouse", "negative_prompt": "blurry", "n": 1, "seed": 5,
                         "width": 64, "height": 64, "steps": 12, "guidance_scale": 6.0, "strength": 0.4,
                         "quality": "high"}


class SilentEngine(FakeServerEngine):
    """A free plugin that takes no negative prompt and says nothing of what it used."""


class SayingEngine(FakeServerEngine):
    """A free plugin that takes a negative prompt and reports what it used: the tag `unused` names the
    parameters it did not (None in its metadata), `used` gives `key=value` pairs it changed."""

    capabilities = Capabilities(img2img=True, upscale=True, negative_prompt=True, leaves_machine=True)

    async def run(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
        result = await super().run(req, progress, cancel)
        result.metadata.update(dict.fromkeys(key for key in req.tags.get("unused", "").split(",") if key))
        result.metadata.update((key, float(value)) for key, _, value in
                               (pair.partition("=") for pair in req.tags.get("used", "").split(",") if pair))
        return result


def _free(engine: FakeServerEngine) -> FakeServerEngine:
    engine._prices = PriceTable(engine.name, {"fake-1": {"image": 0}}, "2026-11")
    return engine


def factory(ctx: EngineContext) -> FakeServerEngine:
    return _free(SayingEngine(ctx, name="says"))


def silent_factory(ctx: EngineContext) -> FakeServerEngine:
    return _free(SilentEngine(ctx, name="silent"))


@pytest.fixture
def services(make_settings: Callable[..., Settings]) -> Iterator[Services]:
    built = Services.build(make_settings(engines=ENGINES))
    yield built
    asyncio.run(built.aclose())


def render(services: Services, engine: str, **tags: str) -> tuple[Asset, dict[str, Any], str]:
    """Run a job of ASKED on `engine` to its end: its asset, and its PNG's JSON record and infotext."""
    job_id = new_id("job")
    with services.db.transaction() as s:
        project = Project(id=new_id("prj"), name="records", policy="balanced")
        s.add(project)
        s.flush()
        s.add(Job(id=job_id, project_id=project.id, stage="bridge", engine=engine, model="fake-1",
                  params={**ASKED, "tags": tags}, estimated=0, status="queued"))
    claims = services.scheduler._claim_ready({})
    assert [claim.job.id for claim, _lane in claims] == [job_id]
    asyncio.run(services.runner.run(claims[0][0]))
    with services.db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status == "succeeded", job and job.error
        [asset] = s.exec(select(Asset).where(col(Asset.job_id) == job_id)).all()
    with Image.open(io.BytesIO(services.store.get(asset.sha256))) as img:
        chunk, parameters = json.loads(img.info["orchestrator"]), str(img.info["parameters"])
    assert chunk == {**asset.record, "model": "fake-1"}
    return asset, chunk, parameters


def test_a_parameter_the_engine_says_it_did_not_use_is_left_out_of_the_record(services: Services) -> None:
    asset, record, parameters = render(services, "says")
    # Silent: the job's values are recorded, as before.
    assert (record["negative_prompt"], record["steps"], record["strength"], record["quality"]) == (
        "blurry", 12, 0.4, "high")
    assert "Negative prompt: blurry" in parameters and "Steps: 12" in parameters
    assert "Denoising strength: 0.4" in parameters

    asset, record, parameters = render(services, "says", unused="negative_prompt,steps,strength,quality,sampler")
    assert asset.negative_prompt == record["negative_prompt"] == ""
    assert not {"steps", "strength", "quality", "sampler"} & set(record)
    assert record["guidance_scale"] == 6.0  # not said: the job's
    assert "Negative prompt" not in parameters and "Steps:" not in parameters
    assert "Denoising strength" not in parameters and "CFG scale: 6.0" in parameters


def test_a_value_the_engine_reports_is_recorded_over_the_job_s(services: Services) -> None:
    _, record, parameters = render(services, "says", used="strength=0.2,creativity=0.25")
    assert (record["strength"], record["creativity"]) == (0.2, 0.25)
    assert "Denoising strength: 0.2" in parameters


def test_an_engine_that_takes_no_negative_prompt_and_says_nothing_records_none(services: Services) -> None:
    asset, record, parameters = render(services, "silent")
    assert asset.negative_prompt == record["negative_prompt"] == ""
    assert "Negative prompt" not in parameters and record["steps"] == 12  # the rest as asked
    with services.db.session() as s:  # the job keeps what was asked, for a promotion to an engine that takes it
        assert s.scalar(select(Job.params).where(col(Job.id) == asset.job_id))["negative_prompt"] == "blurry"
