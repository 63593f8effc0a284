"""Asset content: a just-made image is served from memory, older ones from the store on disk, and
both answer conditional requests by their sha256 ETag."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import sqlite3
from collections.abc import Callable
from typing import BinaryIO

import anyio
import httpx
import pytest
from starlette.testclient import TestClient
from starlette.types import Message

from orchestrator.app import create_app
from orchestrator.services import Services
from orchestrator.settings import Settings
from orchestrator.store import ArtifactStore, RecentContent
from tests.api import SMALL, asgi_messages, asgi_scope, create_project, run_draft

SettingsFactory = Callable[..., Settings]
MIB = 2**20


def test_fresh_content_is_served_from_memory_and_the_rest_from_disk(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client]) -> None:
    settings = make_settings()
    first = start_server(settings)
    project = create_project(first)["id"]
    job = run_draft(first, project, n=2, seed=7, **SMALL)
    assets = [first.get(f"/v1/assets/{a}").json() for a in job["assets"]]
    kept, lost = assets
    # The store loses one file behind the service's back: the service still has the fresh bytes.
    ArtifactStore(settings.assets_dir).path_for(lost["sha256"]).unlink()
    for asset in assets:
        content = first.get(asset["content_url"])
        assert content.status_code == 200
        assert hashlib.sha256(content.content).hexdigest() == asset["sha256"]

    # A new service has nothing in memory: it reads the disk and says plainly what is missing. (The
    # first one is idle, so the second's start-up recovery finds nothing of it to touch.)
    second = start_server(settings)
    content = second.get(kept["content_url"])
    assert content.status_code == 200
    assert hashlib.sha256(content.content).hexdigest() == kept["sha256"]
    # The asset is there (its metadata answers): its file is not, which is not a 404.
    assert second.get(f"/v1/assets/{lost['id']}").status_code == 200
    missing = second.get(lost["content_url"])
    assert missing.status_code == 500
    assert missing.json()["error"]["code"] == "content_unavailable"
    assert missing.json()["error"]["details"] == {"sha256": lost["sha256"], "reason": "missing"}
    assert "missing from the store" in missing.json()["error"]["message"]
    assert "etag" not in missing.headers and "cache-control" not in missing.headers


def test_a_damaged_file_is_never_served_as_the_image(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client]) -> None:
    """A file whose bytes no longer hash to its name (a disk error, a bad restore) is refused, not
    served for clients to cache for a year under the right ETag; once restored, it is served."""
    settings = make_settings()
    client = start_server(settings)
    project = create_project(client)["id"]
    asset = client.get(f"/v1/assets/{run_draft(client, project, n=1, seed=4, **SMALL)['assets'][0]}").json()
    path = ArtifactStore(settings.assets_dir).path_for(asset["sha256"])
    good = path.read_bytes()
    path.write_bytes(b"x\n")
    restarted = start_server(settings)  # nothing of it in memory: read from the disk
    damaged = restarted.get(asset["content_url"])
    assert damaged.status_code == 500
    assert damaged.json()["error"]["code"] == "content_unavailable"
    assert damaged.json()["error"]["details"]["reason"] == "damaged"
    assert "cache-control" not in damaged.headers
    # A client's copy is the image whatever became of the file: its revalidation still holds.
    kept = restarted.get(asset["content_url"], headers={"If-None-Match": f'"{asset["sha256"]}"'})
    assert kept.status_code == 304
    # Nor is it sent to an engine as a bridge's seed: refused at once, as a missing file is (it was
    # accepted, held its estimate on a paid route, and failed when the job read it).
    for stage in ("promote", "polish"):
        refused = restarted.post(f"/v1/assets/{asset['id']}/{stage}", json={"engine": "local-hifi"})
        assert refused.status_code == 500 and refused.json()["error"]["code"] == "content_unavailable"
        assert refused.json()["error"]["details"] == {"asset_id": asset["id"], "sha256": asset["sha256"],
                                                      "reason": "damaged"}
        assert "damaged in the store" in refused.json()["error"]["message"]
    assert restarted.get("/v1/jobs", params={"stage": "bridge"}).json()["items"] == []
    path.write_bytes(good)  # restored: served at once, the damaged bytes were never kept
    restored = restarted.get(asset["content_url"])
    assert restored.status_code == 200 and restored.content == good


def test_content_answers_if_none_match_with_304(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client]) -> None:
    settings = make_settings()
    client = start_server(settings)
    project = create_project(client)["id"]
    asset_id = run_draft(client, project, n=1, seed=3, **SMALL)["assets"][0]
    restarted = start_server(settings)
    for api in (client, restarted):  # from memory, then from disk
        url = f"/v1/assets/{asset_id}/content"
        full = api.get(url)
        etag = full.headers["etag"]
        assert etag == f'"{hashlib.sha256(full.content).hexdigest()}"'
        assert full.headers["content-disposition"] == f'inline; filename="{asset_id}.png"'  # not "content"
        unchanged = api.get(url, headers={"If-None-Match": f'"{"0" * 64}", {etag}'})
        assert unchanged.status_code == 304
        assert unchanged.content == b""
        assert unchanged.headers["etag"] == etag
        assert api.get(url, headers={"If-None-Match": f"W/{etag}"}).status_code == 304
        assert api.get(url, headers={"If-None-Match": "*"}).status_code == 304
        # Two header lines are one list: the match on the second line counts.
        lines = [("If-None-Match", f'"{"0" * 64}"'), ("If-None-Match", etag)]
        assert api.get(url, headers=lines).status_code == 304
        other = api.get(url, headers={"If-None-Match": f'"{"0" * 64}"'})
        assert other.status_code == 200
        assert other.content == full.content


def test_an_asset_whose_row_names_no_file_is_unavailable_not_missing(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client]) -> None:
    """A sha256 mended by hand (upper-cased) names no file: its content and its promotion said 404
    "no such asset content" of an asset its metadata showed."""
    settings = make_settings()
    client = start_server(settings)
    project = create_project(client)["id"]
    asset = client.get(f"/v1/assets/{run_draft(client, project, n=1, seed=4, **SMALL)['assets'][0]}").json()
    with sqlite3.connect(settings.data_dir / "orchestrator.db") as db:
        db.execute("UPDATE assets SET sha256 = upper(sha256) WHERE id = ?", (asset["id"],))
    restarted = start_server(settings)  # nothing of it in memory
    for answer in (restarted.get(asset["content_url"]),
                   restarted.post(f"/v1/assets/{asset['id']}/promote", json={"engine": "local-hifi"})):
        assert answer.status_code == 500, answer.text
        error = answer.json()["error"]
        assert error["code"] == "content_unavailable" and error["details"]["reason"] == "malformed"
        assert "orchestrator check" in error["message"]


def test_an_asset_deleted_and_swept_between_its_row_and_its_file_is_gone_not_lost(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader found the row live, then the asset was deleted and the sweep took its file before
    the reader opened it: the content and a promotion were a 500 asking for a restore from backup."""
    settings = make_settings()
    client = start_server(settings)
    project = create_project(client)["id"]
    asset_ids = run_draft(client, project, n=2, seed=5, **SMALL)["assets"]
    restarted = start_server(settings)  # nothing in memory: the row is read, then the file
    store = ArtifactStore(settings.assets_dir)
    read = ArtifactStore.get_or_open  # what `get` reads through too
    swept: list[str] = []

    def deleted_meanwhile(self: ArtifactStore, sha256: str, *, up_to: int | None) -> bytes | BinaryIO:
        asset = next(a for a in asset_ids if a not in swept)
        swept.append(asset)
        with httpx.Client(base_url=str(restarted.base_url)) as other:  # another client's delete
            assert other.delete(f"/v1/assets/{asset}").status_code == 204
        store.path_for(sha256).unlink()  # and the sweep, as the file was no other asset's
        return read(self, sha256, up_to=up_to)

    monkeypatch.setattr(ArtifactStore, "get_or_open", deleted_meanwhile)
    content = restarted.get(f"/v1/assets/{asset_ids[0]}/content")
    promoted = restarted.post(f"/v1/assets/{asset_ids[1]}/promote", json={"engine": "local-hifi"})
    assert swept == asset_ids
    for answer, asset_id in ((content, asset_ids[0]), (promoted, asset_ids[1])):
        assert answer.status_code == 410, answer.text
        error = answer.json()["error"]
        assert error["code"] == "gone" and error["details"]["asset_id"] == asset_id


def _large_image(client: TestClient) -> tuple[Services, str, str]:
    """The client's service, and the id and sha256 of a draft of its own: noise from the tiny model,
    a 1024 px PNG of about 2.5 MB. (TestClient is an httpx2.Client, whose calls are httpx's.)"""
    services: Services = client.app.state.services  # type: ignore[attr-defined]
    project = create_project(client)["id"]
    job = run_draft(client, project, n=1, seed=3, width=1024, height=1024, steps=1)  # type: ignore[arg-type]
    asset_id = job["assets"][0]
    return services, asset_id, client.get(f"/v1/assets/{asset_id}").json()["sha256"]


def test_a_large_image_is_sent_a_chunk_at_a_time_whether_in_memory_or_on_disk(make_settings: SettingsFactory) -> None:
    """A large image went out in one piece, which the server's socket buffer kept whole for as long as
    its client took to read it: 100 connections asking for 10 MB images and reading nothing held
    836 MB of the service's memory. Sent a chunk at a time, a client holds at most a few of them; the
    bytes, their Content-Length and the check of a damaged file are as they were."""
    settings = make_settings()
    with TestClient(create_app(settings)) as client:
        services, asset_id, sha256 = _large_image(client)
        path = services.store.path_for(sha256)
        image = path.read_bytes()
        assert len(image) > 2 * MIB
        for where in ("memory", "disk"):
            if where == "disk":
                services.store.recent = RecentContent()  # as a restarted service: read from the store
            sent = asgi_messages(client, "GET", f"/v1/assets/{asset_id}/content", timeout=30)
            start, *bodies = sent
            assert start["status"] == 200, where
            headers = {name.decode(): value.decode() for name, value in start["headers"]}
            assert headers["content-length"] == str(len(image)) and headers["etag"] == f'"{sha256}"', where
            assert headers["content-type"] == "image/png", where
            assert b"".join(body["body"] for body in bodies) == image, where
            assert max(len(body["body"]) for body in bodies) <= MIB / 4, where
            assert services.store.recent.get(asset_id) is None or where == "memory"  # not kept whole
        head = client.head(f"/v1/assets/{asset_id}/content")
        assert head.status_code == 200 and head.headers["content-length"] == str(len(image)) and head.content == b""
        assert hashlib.sha256(client.get(f"/v1/assets/{asset_id}/content").content).hexdigest() == sha256
        # A large file damaged in the store is still never served.
        path.write_bytes(image[:-1] + bytes([image[-1] ^ 1]))
        services.store.recent = RecentContent()
        damaged = client.get(f"/v1/assets/{asset_id}/content")
        assert damaged.status_code == 500, damaged.text
        assert damaged.json()["error"]["code"] == "content_unavailable"
        assert damaged.json()["error"]["details"] == {"sha256": sha256, "reason": "damaged"}


def _descriptors_on(path: str) -> int:
    """How many of this process's file descriptors are open on `path`."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed since
            count += os.readlink(f"/proc/self/fd/{fd}") == path
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors through /proc")
def test_a_large_image_file_is_closed_when_its_answer_ends_early(make_settings: SettingsFactory) -> None:
    """A HEAD (answered by its headers alone) and a client gone mid-way ended the stream of a large
    image's file with the file still open: it was closed only once the garbage collector came to the
    cycle the cancelled stream left, a descriptor held per such request meanwhile (and a swept
    file's disk space with it). With the collector off, none may stay open."""
    settings = make_settings()
    with TestClient(create_app(settings)) as client:
        services, asset_id, sha256 = _large_image(client)
        path = str(services.store.path_for(sha256))
        assert os.path.getsize(path) > 2 * MIB
        url = f"/v1/assets/{asset_id}/content"

        def gone_after_a_chunk(spec_version: str) -> None:
            requests = iter([{"type": "http.request", "body": b"", "more_body": False}])
            left = anyio.Event()

            async def receive() -> Message:
                for request in requests:
                    return request
                await left.wait()
                return {"type": "http.disconnect"}

            async def send(message: Message) -> None:
                if message["type"] == "http.response.body":
                    left.set()  # spec 2.3: told by `receive`; 2.4: by a failing send
                    if spec_version == "2.4":
                        raise OSError("the client is gone")
                    await anyio.sleep(1)

            async def get() -> None:
                with anyio.fail_after(30):
                    try:
                        await client.app(asgi_scope("GET", url, spec_version=spec_version), receive, send)
                    except Exception as exc:  # Starlette's ClientDisconnect, for 2.4
                        assert "ClientDisconnect" in type(exc).__name__, exc

            assert client.portal is not None
            client.portal.call(get)

        gc.collect()
        gc.disable()
        try:
            for _ in range(3):
                services.store.recent = RecentContent()  # read from the store
                assert client.head(url).status_code == 200
                gone_after_a_chunk("2.3")
                gone_after_a_chunk("2.4")
            assert _descriptors_on(path) == 0
        finally:
            gc.enable()
        assert hashlib.sha256(client.get(url).content).hexdigest() == os.path.basename(path).removesuffix(".png")
