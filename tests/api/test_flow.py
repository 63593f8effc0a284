"""The ideation flow end to end: projects, drafts, jobs, assets, PNG metadata, lists, operations."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from PIL import Image

from orchestrator.settings import Settings
from tests.api import assert_error, create_project, run_draft, submit_draft, wait_for_job

PROJECT_KEYS = {"id", "name", "policy", "budget", "created_at"}
JOB_KEYS = {"id", "project_id", "stage", "engine", "status", "params", "progress", "assets", "source_asset_id",
            "error", "cost", "routing", "attempts", "created_at", "started_at", "finished_at"}
ASSET_KEYS = {"id", "project_id", "job_id", "stage", "parent_id", "engine", "model", "prompt", "negative_prompt",
              "seed", "width", "height", "sha256", "created_at", "content_url", "record", "deleted_at"}
REMOTE = ("gemini", "openai", "stability", "replicate", "fal")


def test_create_project_shape(server: httpx.Client) -> None:
    response = server.post("/v1/projects", json={"name": "  Lighthouse  ", "budget": {"limit": 50, "period": "month"}})
    assert response.status_code == 201
    project = response.json()
    assert set(project) >= PROJECT_KEYS
    assert project["name"] == "Lighthouse"
    assert project["policy"] == "balanced"
    assert project["budget"] == {"limit": 50, "period": "month"}
    assert re.match(r"^\d{4}-\d\d-\d\dT", project["created_at"])
    assert server.get(f"/v1/projects/{project['id']}").json() == project

    no_budget = create_project(server, "free")
    assert no_budget["budget"] == {"limit": None, "period": "none"}


def test_drafts_flow_assets_and_png_metadata(server: httpx.Client) -> None:
    project = create_project(server)
    response = server.post(f"/v1/projects/{project['id']}/drafts",
                           json={"prompt": "a lighthouse at dusk", "negative_prompt": "fog", "n": 3, "seed": 1234,
                                 "width": 64, "height": 64, "steps": 2, "guidance_scale": 2.0,
                                 "tags": {"shot": "12"}})
    assert response.status_code == 202, response.text
    job = response.json()
    assert set(job) >= JOB_KEYS
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["stage"] == "ideation"
    assert job["engine"] == "lite"
    assert job["project_id"] == project["id"]
    assert job["status"] in ("queued", "running")
    assert job["params"]["seed"] == 1234
    assert job["params"]["tags"] == {"shot": "12"}
    assert job["cost"]["estimated"] == 0

    done = wait_for_job(server, job["id"], ("succeeded",))
    assert done["error"] is None
    assert len(done["assets"]) == 3
    assert len(set(done["assets"])) == 3
    assert done["progress"]["fraction"] == 1.0
    assert done["started_at"] is not None and done["finished_at"] is not None
    assert done["attempts"] == [{"engine": "lite", "status": "succeeded", "error": None}]

    for index, asset_id in enumerate(done["assets"]):
        asset = server.get(f"/v1/assets/{asset_id}").json()
        assert set(asset) == ASSET_KEYS
        assert asset["id"] == asset_id
        assert asset["job_id"] == job["id"]
        assert asset["project_id"] == project["id"]
        assert asset["stage"] == "ideation"
        assert asset["parent_id"] is None
        assert asset["engine"] == "lite"
        assert asset["model"] == "builtin:tiny-sd"
        assert asset["prompt"] == "a lighthouse at dusk"
        assert asset["negative_prompt"] == "fog"
        assert asset["seed"] == 1234 + index
        assert (asset["width"], asset["height"]) == (64, 64)
        assert re.fullmatch(r"[0-9a-f]{64}", asset["sha256"])
        assert asset["content_url"] == f"/v1/assets/{asset_id}/content"

        content = server.get(asset["content_url"])
        assert content.status_code == 200
        assert content.headers["content-type"] == "image/png"
        assert hashlib.sha256(content.content).hexdigest() == asset["sha256"]
        with Image.open(io.BytesIO(content.content)) as img:
            assert img.format == "PNG"
            assert img.size == (64, 64)
            parameters = img.info["parameters"]
            record = json.loads(img.info["orchestrator"])
        prompt_line, negative_line, pairs = parameters.split("\n")
        assert prompt_line == "a lighthouse at dusk"
        assert negative_line == "Negative prompt: fog"
        assert "Steps: 2" in pairs
        assert f"Seed: {1234 + index}" in pairs
        assert "Size: 64x64" in pairs
        assert record["seed"] == 1234 + index
        assert record["prompt"] == "a lighthouse at dusk"
        assert record["negative_prompt"] == "fog"
        assert "parent_id" in record and record["parent_id"] is None
        assert record["stage"] == "ideation"
        assert record["engine"] == "lite"
        assert (record["width"], record["height"]) == (64, 64)
        assert record["steps"] == 2
        assert asset["record"] == record  # the metadata tells what the PNG holds, without decoding it


def test_a_prompt_cut_to_the_text_encoder_s_window_says_so_in_each_image_s_record(server: httpx.Client) -> None:
    project = create_project(server)["id"]
    job = run_draft(server, project, prompt=" ".join(["a lighthouse at dusk"] * 30), n=2, width=64, height=64,
                    steps=1)
    for asset_id in job["assets"]:
        record = server.get(f"/v1/assets/{asset_id}").json()["record"]
        [note] = record["notes"]
        assert note.startswith("the prompt is ") and note.endswith("the model read the first 75"), note
        with Image.open(io.BytesIO(server.get(f"/v1/assets/{asset_id}/content").content)) as img:
            assert json.loads(img.info["orchestrator"])["notes"] == [note]


def test_list_pagination(server: httpx.Client) -> None:
    created = [create_project(server, f"p{i}")["id"] for i in range(5)]

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, str | int] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = server.get("/v1/projects", params=params).json()
        assert set(page) == {"items", "next_cursor"}
        assert len(page["items"]) <= 2
        seen += [p["id"] for p in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert pages < 10
    assert seen == created  # ids are time-ordered: creation order, no gaps, no repeats
    assert pages == 3

    exact = server.get("/v1/projects", params={"limit": 5}).json()
    assert len(exact["items"]) == 5 and exact["next_cursor"] is None
    # Newest first, and its cursor goes on backwards (once ignored: oldest first without a word).
    newest = server.get("/v1/projects", params={"limit": 3, "order": "desc"}).json()
    assert [p["id"] for p in newest["items"]] == created[:1:-1] and newest["next_cursor"] == created[2]
    older = server.get("/v1/projects", params={"order": "desc", "cursor": created[2]}).json()
    assert [p["id"] for p in older["items"]] == created[1::-1] and older["next_cursor"] is None

    project = created[0]
    jobs = [submit_draft(server, project, seed=i)["id"] for i in range(3)]
    first = server.get("/v1/jobs", params={"project_id": project, "limit": 2}).json()
    assert [j["id"] for j in first["items"]] == jobs[:2]
    assert first["next_cursor"] == jobs[1]
    rest = server.get("/v1/jobs", params={"project_id": project, "limit": 2, "cursor": first["next_cursor"]}).json()
    assert [j["id"] for j in rest["items"]] == jobs[2:]
    assert rest["next_cursor"] is None
    # Newest first, for a dashboard's latest jobs (they were on the last page only).
    newest = server.get("/v1/jobs", params={"project_id": project, "limit": 2, "order": "desc"}).json()
    assert [j["id"] for j in newest["items"]] == jobs[:0:-1] and newest["next_cursor"] == jobs[1]
    older = server.get("/v1/jobs", params={"project_id": project, "order": "desc", "cursor": jobs[1]}).json()
    assert [j["id"] for j in older["items"]] == jobs[:1] and older["next_cursor"] is None
    bad = server.get("/v1/jobs", params={"order": "newest"})
    assert bad.status_code == 422 and bad.json()["error"]["details"]["errors"][0]["loc"] == ["query", "order"]
    assert server.get("/v1/jobs", params={"project_id": created[1]}).json()["items"] == []
    for job_id in jobs:
        wait_for_job(server, job_id, ("succeeded",))
    assert [j["id"] for j in server.get("/v1/jobs", params={"status": "succeeded"}).json()["items"]] == jobs
    assert server.get("/v1/jobs", params={"status": "running"}).json()["items"] == []
    assert len(server.get("/v1/jobs", params={"stage": "ideation"}).json()["items"]) == 3
    # By engine (once ignored: ?engine=fal listed every job): drafts run on lite.
    assert len(server.get("/v1/jobs", params={"engine": "lite"}).json()["items"]) == 3
    assert server.get("/v1/jobs", params={"engine": "fal"}).json()["items"] == []
    assets = server.get(f"/v1/projects/{project}/assets").json()["items"]
    newest = server.get(f"/v1/projects/{project}/assets", params={"order": "desc"}).json()["items"]
    assert len(assets) > 1 and newest == assets[::-1]
    assert server.get("/v1/jobs", params={"stage": "bridge"}).json()["items"] == []


def test_project_assets_by_stage(server: httpx.Client) -> None:
    project = create_project(server)
    other = create_project(server, "other")
    job = run_draft(server, project["id"], n=3)
    run_draft(server, other["id"], n=1)

    ideation = server.get(f"/v1/projects/{project['id']}/assets", params={"stage": "ideation"}).json()
    assert [a["id"] for a in ideation["items"]] == job["assets"]
    assert all(a["stage"] == "ideation" and a["project_id"] == project["id"] for a in ideation["items"])
    assert ideation["next_cursor"] is None
    assert server.get(f"/v1/projects/{project['id']}/assets", params={"stage": "bridge"}).json()["items"] == []

    first = server.get(f"/v1/projects/{project['id']}/assets", params={"limit": 2}).json()
    assert [a["id"] for a in first["items"]] == job["assets"][:2]
    rest = server.get(f"/v1/projects/{project['id']}/assets",
                      params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [a["id"] for a in rest["items"]] == job["assets"][2:]
    assert rest["next_cursor"] is None


def test_patch_project(server: httpx.Client) -> None:
    project = create_project(server, "before", budget={"limit": 10, "period": "day"})
    response = server.patch(f"/v1/projects/{project['id']}", json={"name": "after"})
    assert response.status_code == 200
    assert response.json()["name"] == "after"
    assert response.json()["budget"] == {"limit": 10, "period": "day"}  # untouched fields stay

    response = server.patch(f"/v1/projects/{project['id']}",
                            json={"policy": "local-only", "budget": {"limit": 12.5, "period": "week"}})
    assert response.status_code == 200
    fetched = server.get(f"/v1/projects/{project['id']}").json()
    assert fetched["name"] == "after"
    assert fetched["policy"] == "local-only"
    assert fetched["budget"] == {"limit": 12.5, "period": "week"}
    assert fetched["created_at"] == project["created_at"]


def test_a_created_project_has_a_location(server: httpx.Client) -> None:
    response = server.post("/v1/projects", json={"name": "located"})
    assert response.status_code == 201
    assert server.get(response.headers["Location"]).json() == response.json()


def test_patch_budget_is_a_merge(server: httpx.Client) -> None:
    # Once a new limit alone reset the period to "none" (a lifetime cap), and a new period alone
    # dropped the limit (no cap at all).
    project = create_project(server, "merge", budget={"limit": 50, "period": "month"})
    url = f"/v1/projects/{project['id']}"
    assert server.patch(url, json={"budget": {"limit": 20}}).json()["budget"] == {"limit": 20, "period": "month"}
    assert server.patch(url, json={"budget": {"period": "week"}}).json()["budget"] == {"limit": 20, "period": "week"}
    assert server.patch(url, json={"budget": {}}).json()["budget"] == {"limit": 20, "period": "week"}
    assert server.patch(url, json={"budget": {"limit": None}}).json()["budget"] == {"limit": None, "period": "week"}
    assert server.patch(url, json={"budget": {"limit": 5}}).json()["budget"] == {"limit": 5, "period": "week"}
    assert server.patch(url, json={"budget": None}).json()["budget"] == {"limit": None, "period": "none"}
    assert server.get(f"{url}/budget").json()["limit"] is None


@pytest.mark.parametrize("field", ["name", "policy"])
def test_patch_cannot_remove_a_required_field(server: httpx.Client, field: str) -> None:
    project = create_project(server, "keep")
    error = assert_error(server.patch(f"/v1/projects/{project['id']}", json={field: None}), 422, "invalid_request")
    assert error["message"].startswith(f"{field}: cannot be removed")
    assert [e["loc"] for e in error["details"]["errors"]] == [["body", field]]
    assert server.get(f"/v1/projects/{project['id']}").json() == project


def test_healthz_metrics_openapi(make_settings: Callable[..., Settings],
                                 start_server: Callable[[Settings], httpx.Client]) -> None:
    client = start_server(make_settings(admin_key="k"))
    health = client.get("/healthz")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert isinstance(health.json()["version"], str)

    authed = httpx.Client(base_url=str(client.base_url), headers={"Authorization": "Bearer k"})
    with authed:
        project = create_project(authed)
        run_draft(authed, project["id"], n=2)
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "# TYPE orchestrator_jobs gauge" in metrics.text
    assert 'orchestrator_jobs{stage="ideation",engine="lite",status="succeeded"} 1' in metrics.text
    assert 'orchestrator_assets{stage="ideation"} 2' in metrics.text
    # The draft's times, as the runner wrote them, in the histograms.
    ran = 'orchestrator_job_duration_seconds_count{stage="ideation",engine="lite",status="succeeded"} 1'
    assert ran in metrics.text
    assert 'orchestrator_job_queue_seconds_count{stage="ideation",engine="lite"} 1' in metrics.text

    spec = client.get("/openapi.json")
    assert spec.status_code == 200
    paths = spec.json()["paths"]
    for path in ("/v1/projects", "/v1/projects/{project_id}/drafts", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events",
                 "/v1/jobs/{job_id}/cancel", "/v1/assets/{asset_id}/content", "/v1/engines", "/healthz"):
        assert path in paths


def test_engines(server: httpx.Client) -> None:
    response = server.get("/v1/engines")
    assert response.status_code == 200
    engines = {e["name"]: e for e in response.json()}
    lite = engines["lite"]
    assert lite["kind"] == "local"
    assert lite["stages"] == ["ideation"]
    assert lite["available"] is True
    assert lite["model"] == "builtin:tiny-sd"
    assert "noise" in lite["note"]
    assert lite["model_defaults"] == {"steps": 4, "guidance_scale": 0.0, "native_size": 512, "few_step": False,
                                      "read_from": "name"}
    hifi = engines["local-hifi"]
    assert hifi["kind"] == "local"
    assert set(hifi["stages"]) == {"bridge", "polish"}
    assert hifi["available"] is True
    for name in REMOTE:
        engine = engines[name]
        assert engine["kind"] == "remote" and engine["model_defaults"] is None
        assert engine["available"] is False, name
        assert engine["note"], f"{name} is unavailable without saying why"
    assert "API key" in engines["gemini"]["note"] or "GEMINI" in engines["gemini"]["note"]


@pytest.mark.parametrize("hifi_model", [None, "builtin:tiny-sd"])
def test_the_smoke_model_s_note_names_the_setting_that_chose_it(
        make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client],
        caplog: pytest.LogCaptureFixture, hifi_model: str | None) -> None:
    """Said once for the engines sharing it through ORCH_LITE_MODEL; local-hifi's own
    ORCH_HIFI_MODEL is named where that one chose it (it told the operator to change the other)."""
    with caplog.at_level("WARNING", logger="orchestrator.services"):
        client = start_server(make_settings(hifi_model=hifi_model))
    notes = [r.getMessage() for r in caplog.records if "random weights" in r.getMessage()]
    said = "builtin:tiny-sd has random weights: its images are noise (set {} to a real model)"
    if hifi_model is None:
        assert notes == [f"lite, local-hifi: {said.format('ORCH_LITE_MODEL')}"]
    else:
        assert notes == [f"lite: {said.format('ORCH_LITE_MODEL')}", f"local-hifi: {said.format('ORCH_HIFI_MODEL')}"]
    engines = {e["name"]: e for e in client.get("/v1/engines").json()}
    assert engines["local-hifi"]["note"] == said.format("ORCH_HIFI_MODEL" if hifi_model else "ORCH_LITE_MODEL")


def test_a_self_hosted_engine_set_up_wrong_is_told_at_start(
        make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client],
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Said only in /v1/engines: the operator's log had nothing. A cloud engine without a key is
    # off by choice, and not told.
    with caplog.at_level("WARNING", logger="orchestrator.services"):
        start_server(make_settings(comfyui_url="http://127.0.0.1:9", comfyui_workflow=str(tmp_path / "wf.json"),
                                   a1111_url="http://127.0.0.1:9", a1111_auth="no-colon"))
    warned = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert any(m.startswith("comfyui: unavailable: ") and "wf.json" in m for m in warned), warned
    assert any(m.startswith("a1111: unavailable: ") and "user:password" in m for m in warned), warned
    assert not any(m.startswith(("gemini", "openai", "stability", "replicate", "fal")) for m in warned), warned


def test_a_self_hosted_engine_s_settings_without_its_server_are_told_at_start(
        make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client],
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A misspelt URL variable (ORCH_A1111_ADDRESS) left the password and the workflow set up for
    # an engine that was off, without a word.
    with caplog.at_level("WARNING", logger="orchestrator.services"):
        start_server(make_settings(comfyui_workflow=str(tmp_path / "wf.json"), a1111_auth="render:pw"))
    warned = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert "comfyui: unavailable: no server: set ORCH_COMFYUI_URL" in warned, warned
    assert "a1111: unavailable: no server: set ORCH_A1111_URL" in warned, warned
    assert not any("pw" in m for m in warned)


def test_a_cloud_model_without_a_price_is_told_at_start_and_in_the_engine_list(
        make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client],
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="orchestrator.services"):
        client = start_server(make_settings(openai_api_key="sk-test", openai_model="gpt-image-typo",
                                            gemini_model="gemini-typo"))  # gemini: no key, off by choice
    warned = [r.getMessage() for r in caplog.records if "no price for model" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("openai: no price for model 'gpt-image-typo'"), warned
    engines = {e["name"]: e for e in client.get("/v1/engines").json()}
    assert engines["openai"]["available"] is True and "no price" in engines["openai"]["note"]


def test_a_model_path_to_nothing_is_told_at_start_not_at_the_first_draft(
        make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client],
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    missing = tmp_path / "models" / "sd-turbo"  # a typo'd folder, not a Hub id
    with caplog.at_level("WARNING", logger="orchestrator.services"):
        client = start_server(make_settings(lite_model=str(missing), hifi_model="builtin:tiny-sd"))
    assert f"lite: unavailable: model '{missing}' is a path to nothing" in caplog.text
    engines = {e["name"]: e for e in client.get("/v1/engines").json()}
    assert engines["lite"]["available"] is False and "no such file or folder" in engines["lite"]["note"]
    assert engines["local-hifi"]["available"] is True
    project = create_project(client)["id"]
    response = client.post(f"/v1/projects/{project}/drafts", json={"prompt": "x", "width": 64, "height": 64})
    assert response.status_code == 503, response.text
    # The log has the path; a client (a project key's too) reads the model by its name.
    assert "model 'sd-turbo' is a path to nothing" in response.json()["error"]["message"]
    assert str(tmp_path) not in response.text
    assert client.get("/v1/jobs").json()["items"] == []


def test_a_model_in_a_local_folder_is_told_by_name_not_by_the_server_s_path(
        make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client],
        tiny_cache_dir: Path) -> None:
    folder = tiny_cache_dir / "tiny-sd"
    client = start_server(make_settings(lite_model=str(folder)))
    project = create_project(client)["id"]
    job = run_draft(client, project, n=1, width=64, height=64, steps=1)
    asset = client.get(f"/v1/assets/{job['assets'][0]}").json()
    lite = next(e for e in client.get("/v1/engines").json() if e["name"] == "lite")
    assert job["model"] == asset["model"] == asset["record"]["model"] == lite["model"] == "tiny-sd"
    for answer in (job, asset, lite):
        assert str(tiny_cache_dir) not in json.dumps(answer)


def test_a_model_whose_name_says_nothing_shows_the_defaults_its_files_gave(
        make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client],
        tiny_cache_dir: Path, tmp_path: Path) -> None:
    """A studio's `lite-v2` folder: which steps and guidance its jobs get, and why, in /v1/engines."""
    folder = tmp_path / "lite-v2"
    shutil.copytree(tiny_cache_dir / "tiny-sd", folder)
    client = start_server(make_settings(lite_model=str(folder)))
    engines = {e["name"]: e for e in client.get("/v1/engines").json()}
    # The tiny pipeline's files say SD 1.x with a 64-latent UNet: 512 px, 25 steps at 7.5.
    assert engines["lite"]["model_defaults"] == {"steps": 25, "guidance_scale": 7.5, "native_size": 512,
                                                 "few_step": False, "read_from": "files"}
    job = run_draft(client, create_project(client)["id"], n=1, width=64, height=64, steps=1, guidance_scale=None)
    assert client.get(f"/v1/assets/{job['assets'][0]}").json()["record"]["guidance_scale"] == 7.5


def test_sizes_the_service_works_out_fit_an_engine_taking_multiples_of_16(
        make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client],
        tmp_path: Path) -> None:
    # A 96x72 draft promoted as it is, or polished at its own size or by 1.125: 72 was refused (422)
    # by an SD3 or FLUX local-hifi model, a size the client never sent.
    model = tmp_path / "sd3-medium"  # named as SD3 is: multiples of 16 (refused at submit, never loaded)
    model.mkdir()
    client = start_server(make_settings(hifi_model=str(model)))
    engines = {e["name"]: e for e in client.get("/v1/engines").json()}
    assert engines["local-hifi"]["capabilities"]["size_multiple"] == 16
    project = create_project(client)["id"]
    [odd] = run_draft(client, project, n=1, width=96, height=72, steps=1)["assets"]
    for route, body in (("promote", {}), ("polish", {"scale": None}), ("polish", {"scale": 1.125})):
        explained = client.post("/v1/route/explain", json={"stage": "bridge" if route == "promote" else "polish",
                                                           "source_asset_id": odd, "engine": "local-hifi", **body})
        assert explained.status_code == 200, (route, body, explained.text)
        width, height = explained.json()["params"]["width"], explained.json()["params"]["height"]
        assert width % 16 == 0 and height % 16 == 0, (route, body, width, height)
    refused = client.post(f"/v1/assets/{odd}/promote", json={"engine": "local-hifi", "width": 96, "height": 72})
    assert_error(refused, 422, "invalid_request")  # a size the client sent is its own: refused, not changed


def test_jobs_by_an_engine_name_no_job_was_ever_on_is_refused(
        make_settings: Callable[..., Settings], start_server: Callable[[Settings], httpx.Client]) -> None:
    # A typo was read as "no jobs" (a misspelt status or stage is refused); an engine a job was
    # on, since removed from the configuration, is still a filter.
    settings = make_settings()
    server = start_server(settings)
    job = run_draft(server, create_project(server)["id"], n=1)
    typo = assert_error(server.get("/v1/jobs", params={"engine": "lte"}), 422, "invalid_request")
    assert typo["message"].startswith("unknown engine 'lte' (known: ") and "lite" in typo["details"]["known"]
    with sqlite3.connect(settings.data_dir / "orchestrator.db") as db:
        db.execute("UPDATE jobs SET engine = 'retired' WHERE id = ?", (job["id"],))
    assert [j["id"] for j in server.get("/v1/jobs", params={"engine": "retired"}).json()["items"]] == [job["id"]]
