"""The three tiers end to end over real HTTP: draft on Lite, bridge on Gemini (a fake provider on
loopback speaking the generateContent wire format), polish on local-hifi; and the same workflow
offline, on local engines only."""

from __future__ import annotations

import base64
import io
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from orchestrator.errors import EngineError
from tests.routing import create_project, ledger, promote, run_draft, submit, wait_for_job
from tests.routing.conftest import SettingsFactory, running, write_policies
from tests.routing.fake_gemini import FakeGemini
from tiers.base import EngineContext
from tiers.gemini import GeminiEngine

API_KEY = "test-key"
MODEL = "gemini-3.1-flash-image"
USAGE: dict[str, Any] = {"promptTokenCount": 1300, "candidatesTokenCount": 1000, "totalTokenCount": 2300,
                         "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 1000}]}
# tiers/gemini.py defaults for gemini-3.1-flash-image, in credits per 1M tokens.
OUTPUT_PER_MILLION, INPUT_PER_MILLION = 6000, 50
PROMPT = "a lighthouse at dusk"


def usage_cost() -> float:
    """Credits for USAGE at the configured token prices, rounded up to a millicredit."""
    millicredits = math.ceil((USAGE["candidatesTokenCount"] * OUTPUT_PER_MILLION * 1000
                              + USAGE["promptTokenCount"] * INPUT_PER_MILLION * 1000) / 1e6)
    return millicredits / 1000


def provider_image() -> Image.Image:
    img = Image.new("RGB", (64, 64))
    img.putdata([(x * 4, y * 4, 200) for y in range(64) for x in range(64)])
    return img


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def pixels(data: bytes) -> tuple[tuple[int, int], bytes]:
    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")
        return rgb.size, rgb.tobytes()


@pytest.fixture(scope="module")
def gemini() -> Iterator[FakeGemini]:
    image = png(provider_image())
    with FakeGemini(lambda _call: image, USAGE) as fake:
        yield fake


@pytest.fixture(scope="module")
def online(new_settings: SettingsFactory, gemini: FakeGemini) -> Iterator[httpx.Client]:
    with running(new_settings(gemini_api_key=API_KEY, gemini_base_url=gemini.url)) as client:
        yield client


def content(client: httpx.Client, asset_id: str) -> bytes:
    response = client.get(f"/v1/assets/{asset_id}/content")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    return response.content


def chunks(data: bytes) -> tuple[str, dict[str, Any]]:
    """The PNG's `parameters` infotext and its `orchestrator` JSON record."""
    with Image.open(io.BytesIO(data)) as img:
        return str(img.info["parameters"]), json.loads(img.info["orchestrator"])


def polish(client: httpx.Client, asset_id: str, **body: Any) -> dict[str, Any]:
    return submit(client, f"/v1/assets/{asset_id}/polish", {"scale": 2, "cache": False, **body})


def test_draft_bridge_on_gemini_polish_on_local_hifi(online: httpx.Client, gemini: FakeGemini) -> None:
    client = online
    listed = {e["name"]: e for e in client.get("/v1/engines").json()}
    assert listed["gemini"]["available"] is True and listed["gemini"]["kind"] == "remote"
    project = create_project(client, "tiers")
    draft_job = run_draft(client, project["id"], prompt=PROMPT)
    draft_id = draft_job["assets"][0]
    draft_png = content(client, draft_id)

    bridge_job = promote(client, draft_id, engine="gemini")
    assert bridge_job["engine"] == "gemini"
    assert bridge_job["routing"]["reason"] == "requested by the client"
    bridge_job = wait_for_job(client, bridge_job["id"])
    assert bridge_job["status"] == "succeeded", bridge_job["error"]
    assert bridge_job["attempts"] == [{"engine": "gemini", "status": "succeeded", "error": None}]
    bridge_id = bridge_job["assets"][0]

    # What the provider received: the key header, the prompt, and the draft's exact pixels.
    assert len(gemini.received) == 1
    sent = gemini.received[0]
    assert sent["path"] == f"/v1beta/models/{MODEL}:generateContent"
    headers = {k.lower(): v for k, v in sent["headers"].items()}
    assert headers["x-goog-api-key"] == API_KEY
    parts = sent["body"]["contents"][0]["parts"]
    assert PROMPT in parts[0]["text"]
    inline = parts[1].get("inline_data") or parts[1]["inlineData"]
    assert (inline.get("mime_type") or inline["mimeType"]) == "image/png"
    assert pixels(base64.b64decode(inline["data"])) == pixels(draft_png)
    assert sent["body"]["generationConfig"]["responseModalities"] == ["IMAGE"]
    assert sent["body"]["generationConfig"]["imageConfig"] == {"aspectRatio": "1:1", "imageSize": "1K"}

    # What it made is the bridge asset; the charge is the usage-based cost, captured from the hold.
    bridge_png = content(client, bridge_id)
    assert pixels(bridge_png) == pixels(png(provider_image()))
    expected = usage_cost()
    assert bridge_job["cost"]["charged"] == expected
    assert bridge_job["cost"]["held"] == 0
    estimated = bridge_job["cost"]["estimated"]
    assert estimated > expected
    entries = ledger(client, project["id"], bridge_job["id"])
    assert [(e["kind"], e["amount"], e["engine"]) for e in entries] == [
        ("hold", estimated, "gemini"), ("capture", expected, "gemini"),
        ("release", round(estimated - expected, 3), "gemini")]
    assert not entries[1]["unreconciled"] and entries[1]["hold_id"] == entries[0]["id"]

    final_job = wait_for_job(client, polish(client, bridge_id, engine="local-hifi")["id"])
    assert final_job["status"] == "succeeded", final_job["error"]
    assert final_job["engine"] == "local-hifi" and final_job["cost"]["charged"] == 0
    final_id = final_job["assets"][0]

    assets = {stage: client.get(f"/v1/assets/{a}").json()
              for stage, a in (("ideation", draft_id), ("bridge", bridge_id), ("polish", final_id))}
    assert [assets[s]["parent_id"] for s in assets] == [None, draft_id, bridge_id]
    assert [assets[s]["engine"] for s in assets] == ["lite", "gemini", "local-hifi"]
    assert assets["bridge"]["model"] == MODEL
    assert (assets["polish"]["width"], assets["polish"]["height"]) == (128, 128)

    lineage = client.get(f"/v1/assets/{final_id}/lineage").json()
    assert [a["id"] for a in lineage["ancestors"]] == [draft_id, bridge_id]
    assert [a["stage"] for a in lineage["ancestors"]] == ["ideation", "bridge"]
    assert lineage["descendants"] == []
    assert lineage["asset"] == client.get(f"/v1/assets/{final_id}").json()  # the whole chain in one answer
    from_root = client.get(f"/v1/assets/{draft_id}/lineage").json()
    assert from_root["ancestors"] == []
    assert [a["id"] for a in from_root["descendants"]] == [bridge_id, final_id]

    # Each PNG carries A1111 infotext and the generation record with its parent.
    for stage, asset_id, data, engine in (("ideation", draft_id, draft_png, "lite"),
                                          ("bridge", bridge_id, bridge_png, "gemini"),
                                          ("polish", final_id, content(client, final_id), "local-hifi")):
        parameters, record = chunks(data)
        asset = assets[stage]
        assert asset["id"] == asset_id
        assert parameters.splitlines()[0] == PROMPT
        assert f"Engine: {engine}" in parameters and f"Stage: {stage}" in parameters
        assert f"Size: {asset['width']}x{asset['height']}" in parameters
        assert record["parent_id"] == asset["parent_id"]
        assert (record["stage"], record["engine"], record["model"]) == (stage, engine, asset["model"])
        assert (record["width"], record["height"]) == (asset["width"], asset["height"])
        assert record["prompt"] == PROMPT
    _, bridge_record = chunks(bridge_png)
    # Gemini is sent a prompt and an image alone: what else was asked did not make the image.
    assert not {"strength", "quality", "steps", "guidance_scale", "sampler"} & set(bridge_record)
    assert bridge_record["negative_prompt"] == ""
    # The provider's request id is the job's, not the file's (which leaves the studio).
    assert "provider_request_id" not in bridge_record and "resp-1" not in bridge_png.decode("latin-1")
    assert client.get(f"/v1/jobs/{assets['bridge']['job_id']}").json()["provider_request_id"] == "resp-1"
    _, polish_record = chunks(content(client, final_id))
    assert polish_record["scale"] == 2 and polish_record["creativity"] == 0.3

    # The key never comes back in a response.
    explain = client.post("/v1/route/explain", json={"stage": "bridge", "source_asset_id": draft_id,
                                                     "engine": "gemini"})
    assert explain.status_code == 200
    bodies = [client.get(f"/v1/jobs/{j['id']}").text for j in (draft_job, bridge_job, final_job)]
    bodies += [client.get(f"/v1/assets/{a}").text for a in (draft_id, bridge_id, final_id)]
    bodies += [client.get(f"/v1/assets/{final_id}/lineage").text, client.get("/v1/engines").text,
               client.get("/v1/jobs", params={"limit": 500}).text, client.get(f"/v1/projects/{project['id']}").text,
               client.get(f"/v1/projects/{project['id']}/ledger").text, explain.text, client.get("/metrics").text]
    for body in bodies:
        assert API_KEY not in body
    for data in (draft_png, bridge_png):
        assert API_KEY.encode() not in data


@pytest.fixture(scope="module")
def offline(new_settings: SettingsFactory) -> Iterator[httpx.Client]:
    with running(new_settings()) as client:
        yield client


def test_offline_workflow_on_local_engines(offline: httpx.Client) -> None:
    client = offline
    project = create_project(client, "offline")
    assert project["policy"] == "balanced"
    draft_id = run_draft(client, project["id"], prompt=PROMPT)["assets"][0]

    bridge_job = promote(client, draft_id)
    assert bridge_job["engine"] == "local-hifi"
    routing = bridge_job["routing"]
    assert (routing["policy"], routing["rule"], routing["chosen"]) == ("balanced", "cheapest", "local-hifi")
    reasons = {c["engine"]: c["skipped"] for c in routing["candidates"]}
    assert reasons["local-hifi"] is None
    for name in ("gemini", "openai", "stability", "replicate", "fal"):
        assert reasons[name].startswith("unavailable: no API "), reasons[name]
    bridge_job = wait_for_job(client, bridge_job["id"])
    assert bridge_job["status"] == "succeeded", bridge_job["error"]
    bridge_id = bridge_job["assets"][0]

    final_job = polish(client, bridge_id)
    assert final_job["engine"] == "local-hifi"
    final_job = wait_for_job(client, final_job["id"])
    assert final_job["status"] == "succeeded", final_job["error"]
    final_id = final_job["assets"][0]

    lineage = client.get(f"/v1/assets/{final_id}/lineage").json()
    chain = [*lineage["ancestors"], client.get(f"/v1/assets/{final_id}").json()]
    assert [a["id"] for a in chain] == [draft_id, bridge_id, final_id]
    assert [a["stage"] for a in chain] == ["ideation", "bridge", "polish"]
    assert [a["engine"] for a in chain] == ["lite", "local-hifi", "local-hifi"]
    assert [a["parent_id"] for a in chain] == [None, draft_id, bridge_id]
    assert [(a["width"], a["height"]) for a in chain] == [(64, 64), (64, 64), (128, 128)]
    for asset in chain:
        _, record = chunks(content(client, asset["id"]))
        assert record["parent_id"] == asset["parent_id"]

    assert bridge_job["cost"]["charged"] == final_job["cost"]["charged"] == 0
    assert all(e["amount"] == 0 for e in ledger(client, project["id"]))


def test_a_polish_given_a_size_is_priced_as_the_upscale_it_is(new_settings: SettingsFactory) -> None:
    """The service turns a polish's `width`/`height` into a size without a scale; Stability must
    still price (and run) it as an upscale, from the draft's recorded size, not as a refine."""
    settings = new_settings(stability_api_key="sk-test", stability_base_url="http://127.0.0.1:9")
    with running(settings) as client:
        project = create_project(client, "stability")
        draft_id = run_draft(client, project["id"], prompt=PROMPT)["assets"][0]  # 64x64
        for body, estimate in (({"width": 128, "height": 128}, 40.0), ({"scale": 2}, 40.0),
                               ({"width": 64, "height": 64}, 6.5)):
            explained = client.post("/v1/route/explain", json={
                "stage": "polish", "source_asset_id": draft_id, "engine": "stability", **body})
            assert explained.status_code == 200, explained.text
            assert (explained.json()["engine"], explained.json()["estimate"]) == ("stability", estimate), body


def test_an_unused_negative_prompt_still_reaches_the_bridge_and_the_polish(offline: httpx.Client) -> None:
    """The tiny model's drafts run at guidance 0, where a negative prompt has no effect: the draft's
    record leaves it out, and its promotion, reading the asset's, lost the artist's for good."""
    project = create_project(offline, "negative")["id"]
    draft = run_draft(offline, project, prompt=PROMPT, negative_prompt="blurry")
    draft_asset = offline.get(f"/v1/assets/{draft['assets'][0]}").json()
    assert draft_asset["negative_prompt"] == "" and draft["params"]["negative_prompt"] == "blurry"
    bridge = wait_for_job(offline, promote(offline, draft_asset["id"])["id"])
    assert bridge["params"]["negative_prompt"] == "blurry"
    final = polish(offline, bridge["assets"][0])
    assert final["params"]["negative_prompt"] == "blurry"


def test_a_bridge_and_a_polish_run_with_the_steps_and_guidance_asked(offline: httpx.Client) -> None:
    """A bridge took steps but no guidance, a polish neither: local-hifi ran the model's defaults
    whatever the artist asked for. Left out, they are still the model's (4 steps, guidance 0 for
    the tiny one), and a polish that sets none stores neither, as before."""
    project = create_project(offline, "steps")["id"]
    draft_id = run_draft(offline, project, prompt=PROMPT)["assets"][0]
    bridge = wait_for_job(offline, promote(offline, draft_id, steps=6, guidance_scale=2.5)["id"])
    assert bridge["status"] == "succeeded", bridge["error"]
    assert (bridge["params"]["steps"], bridge["params"]["guidance_scale"]) == (6, 2.5)
    final = wait_for_job(offline, polish(offline, bridge["assets"][0], steps=7, guidance_scale=1.5)["id"])
    assert final["status"] == "succeeded", final["error"]
    assert (final["params"]["steps"], final["params"]["guidance_scale"]) == (7, 1.5)
    plain = wait_for_job(offline, polish(offline, bridge["assets"][0])["id"])
    assert "steps" not in plain["params"] and "guidance_scale" not in plain["params"]
    told = {}
    for job in (bridge, final, plain):
        infotext, record = chunks(content(offline, job["assets"][0]))
        told[job["id"]] = (record["steps"], record["guidance_scale"])
        assert f"Steps: {record['steps']}" in infotext and f"CFG scale: {record['guidance_scale']:g}" in infotext
    assert [told[job["id"]] for job in (bridge, final, plain)] == [(6, 2.5), (7, 1.5), (4, 0.0)]


ACME_POLICY = """
name = "acme-test"
description = "Drafts on Lite; bridges on the engine asked for."

[[rules]]
name = "drafts"
match = { stage = "ideation" }
engines = ["lite"]

[[rules]]
name = "bridges"
match = { stage = ["bridge", "polish"] }
engines = ["gemini", "acme"]
"""


class AcmeGemini(GeminiEngine):
    """A third party's engine built on a built-in one (README: plugins may subclass them)."""

    name = "acme"


def acme_factory(ctx: EngineContext) -> AcmeGemini:
    return AcmeGemini(ctx)


@pytest.mark.parametrize("raised", [EngineError, ValueError])
def test_an_engine_s_error_that_quotes_the_key_is_kept_without_it(
        new_settings: SettingsFactory, gemini: FakeGemini, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, tmp_path: Path, raised: type[Exception]) -> None:
    """An engine quotes its provider's answer in an error's message and details (fal's
    `error_type`, a proxy echoing the request's headers), or a bug's exception does: the job's
    record showed the key to every key of the project. Whatever an engine quotes, the key is taken
    out before the job (and the log) keeps it; a third party's engine built on a built-in too."""

    def echoing(self: GeminiEngine, body: dict[str, Any]) -> Any:
        said = f"the proxy said 'x-goog-api-key: {API_KEY}'"
        if raised is EngineError:
            raise EngineError(f"gemini: {said}", retryable=False, charged="no",
                              details={"engine": "gemini", "echo": {"headers": [f"x-goog-api-key: {API_KEY}"]}})
        raise ValueError(said) from KeyError(f"x-goog-api-key: {API_KEY}")

    monkeypatch.setattr(GeminiEngine, "_image", echoing)
    policies = write_policies(tmp_path / "policies", {"acme-test": ACME_POLICY})
    settings = new_settings(gemini_api_key=API_KEY, gemini_base_url=gemini.url, policy="acme-test",
                            policy_dir=policies, engines="acme=tests.routing.test_workflow:acme_factory")
    with running(settings) as client, caplog.at_level(logging.WARNING):
        project = create_project(client, "quoting")
        draft_id = run_draft(client, project["id"], prompt=PROMPT)["assets"][0]
        for engine in ("gemini", "acme"):
            job = wait_for_job(client, promote(client, draft_id, engine=engine)["id"])
            assert job["status"] == "failed" and "x-goog-api-key: ***" in job["error"]["message"], job["error"]
            if raised is EngineError:
                assert job["error"]["details"]["echo"] == {"headers": ["x-goog-api-key: ***"]}
            assert API_KEY not in json.dumps(job), engine
    assert "x-goog-api-key: ***" in caplog.text and API_KEY not in caplog.text
