"""Range requests (RFC 9110 section 14) of an asset's image: one range of bytes is answered 206
with exactly those bytes, one outside the image 416, and any other Range (invalid, several
ranges, an If-Range that is not the image's ETag) is ignored: the image is sent whole."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from PIL import Image
from starlette.testclient import TestClient

from orchestrator.api.ranges import byte_range
from orchestrator.app import create_app
from orchestrator.errors import RangeNotSatisfiable
from orchestrator.services import Services
from orchestrator.settings import Settings
from orchestrator.store import Preview, RecentContent
from tests.api import SMALL, asgi_messages, assert_error, create_project, run_draft
from tests.conftest import SettingsFactory

ETAG = f'"{"a" * 64}"'
MIB = 2**20


@pytest.mark.parametrize(("ranges", "if_range", "expected"), [
    (["bytes=0-99"], [], (0, 99)),
    (["bytes=100-"], [], (100, 999)),
    (["bytes=-100"], [], (900, 999)),
    (["bytes=0-0"], [], (0, 0)),
    (["bytes=999-999"], [], (999, 999)),
    (["bytes=990-5000"], [], (990, 999)),  # a last byte past the end: up to the end
    (["bytes=-5000"], [], (0, 999)),  # a suffix longer than the image: all of it
    (["bytes=0-" + "9" * 5000], [], (0, 999)),  # longer than Python reads as a number
    (["bytes=00010-0020"], [], (10, 20)),
    (["Bytes=1-2"], [], (1, 2)),  # the unit is case-insensitive
    (["bytes=1-2,"], [], (1, 2)),  # an empty list element is none
    ([" bytes=1-2 "], [], (1, 2)),
    (["bytes=1-2"], [ETAG], (1, 2)),
    (["bytes=1-2"], [f" {ETAG} "], (1, 2)),
    ([], [], None),
    ([], [ETAG], None),  # If-Range without Range: nothing to do
    (["bytes=5-2"], [], None),  # last before first: invalid, ignored
    (["bytes=" + "9" * 40 + "-" + "9" * 39], [], None),  # so too with numbers too long to read
    (["bytes=" + "9" * 20 + "-" + "1" + "0" * 19], [], None),  # as long as each other, and too long to read
    (["bytes=a-b"], [], None),
    (["bytes=1-2-3"], [], None),
    (["bytes=\u0661-\u0662"], [], None),  # Arabic-Indic digits are no digits of HTTP
    (["bytes=-"], [], None),
    (["bytes="], [], None),
    (["bytes=,"], [], None),
    (["bytes 0-99"], [], None),
    (["bytes = 0-99"], [], None),
    (["items=0-99"], [], None),  # a unit this service does not know
    (["0-99"], [], None),
    (["bytes=0-1,5-6"], [], None),  # several ranges: the whole image
    (["bytes=0-1, 2000-"], [], None),
    (["bytes=0-1", "bytes=5-6"], [], None),  # a field sent twice that may be sent once
    (["bytes=1-2"], [f"W/{ETAG}"], None),  # If-Range compares strongly
    (["bytes=1-2"], [f'"{"b" * 64}"'], None),
    (["bytes=1-2"], ["Mon, 07 Dec 2026 20:00:00 GMT"], None),  # a date: the image has no Last-Modified
    (["bytes=1-2"], [ETAG, ETAG], None),
    (["bytes=1000-"], [f'"{"b" * 64}"'], None),  # another copy: whole, not 416
])
def test_the_range_asked_for(ranges: list[str], if_range: list[str], expected: tuple[int, int] | None) -> None:
    assert byte_range(ranges, if_range, ETAG, 1000) == expected


@pytest.mark.parametrize("ranges", [["bytes=1000-"], ["bytes=1000-1000"], ["bytes=" + "9" * 5000 + "-"],
                                    ["bytes=-0"], ["bytes=-000"]])
def test_a_range_with_no_byte_of_the_image(ranges: list[str]) -> None:
    with pytest.raises(RangeNotSatisfiable) as raised:
        byte_range(ranges, [], ETAG, 1000)
    assert raised.value.size == 1000 and raised.value.status == 416 and len(raised.value.message) < 200


def test_an_empty_image_s_suffix_range_is_answered_whole() -> None:
    """RFC 9110 14.1.1: of a representation of no bytes, a suffix range of one or more is the one
    satisfiable range; no Content-Range can name its bytes, so it is answered whole (200), never 416."""
    assert byte_range(["bytes=-5"], [], ETAG, 0) is None
    for unsatisfiable in (["bytes=0-"], ["bytes=-0"], ["bytes=0-0"]):
        with pytest.raises(RangeNotSatisfiable) as raised:
            byte_range(unsatisfiable, [], ETAG, 0)
        assert raised.value.size == 0, unsatisfiable


def _image(client: TestClient, **size: Any) -> tuple[Services, str, bytes]:
    """The client's service, and the id and bytes of a draft of its own."""
    services: Services = client.app.state.services  # type: ignore[attr-defined]
    project = create_project(client)["id"]
    asset_id = run_draft(client, project, n=1, seed=5, **size)["assets"][0]  # type: ignore[arg-type]
    image = client.get(f"/v1/assets/{asset_id}/content").content
    assert hashlib.sha256(image).hexdigest() == client.get(f"/v1/assets/{asset_id}").json()["sha256"]
    return services, asset_id, image


def _from_memory_then_disk(services: Services) -> Any:
    """Each way a content is served: just made (from memory), then as a restarted service (from disk)."""
    yield "memory"
    services.store.recent = RecentContent()
    yield "disk"


def test_one_range_of_bytes_is_answered_206_with_those_bytes(make_settings: SettingsFactory) -> None:
    with TestClient(create_app(make_settings())) as client:
        services, asset_id, image = _image(client, **SMALL)
        url = f"/v1/assets/{asset_id}/content"
        size = len(image)
        assert size > 200
        for where in _from_memory_then_disk(services):
            whole = client.get(url)
            assert whole.status_code == 200 and whole.content == image, where
            assert whole.headers["accept-ranges"] == "bytes" and "content-range" not in whole.headers, where
            etag = whole.headers["etag"]
            for asked, first, last in [("bytes=0-99", 0, 99), ("bytes=100-", 100, size - 1),
                                       ("bytes=-100", size - 100, size - 1), ("bytes=7-7", 7, 7),
                                       (f"bytes=10-{size * 10}", 10, size - 1), (f"bytes=-{size + 1}", 0, size - 1)]:
                part = client.get(url, headers={"Range": asked})
                assert part.status_code == 206, (where, asked, part.text)
                assert part.content == image[first:last + 1], (where, asked)
                assert part.headers["content-range"] == f"bytes {first}-{last}/{size}", (where, asked)
                assert part.headers["content-length"] == str(last + 1 - first), (where, asked)
                assert part.headers["content-type"] == "image/png", (where, asked)
                # The headers a 200 would have (RFC 9110 15.3.7): a cache keeps the part under its ETag.
                for name in ("etag", "cache-control", "content-disposition", "accept-ranges"):
                    assert part.headers[name] == whole.headers[name], (where, asked, name)
            # If-Range with the image's ETag: the range; with anything else: the whole image.
            resumed = client.get(url, headers={"Range": "bytes=50-", "If-Range": etag})
            assert resumed.status_code == 206 and resumed.content == image[50:], where
            for other in (f"W/{etag}", f'"{"0" * 64}"', "Mon, 07 Dec 2026 20:00:00 GMT"):
                restarted = client.get(url, headers={"Range": "bytes=50-", "If-Range": other})
                assert restarted.status_code == 200 and restarted.content == image, (where, other)
                assert "content-range" not in restarted.headers, (where, other)
            # If-None-Match is answered first (RFC 9110 13.2.2): a client with the image gets its 304.
            for asked in ("bytes=0-99", f"bytes={size}-"):
                kept = client.get(url, headers={"Range": asked, "If-None-Match": etag})
                assert kept.status_code == 304 and kept.content == b"", (where, asked)
                assert kept.headers["etag"] == etag and "content-range" not in kept.headers, (where, asked)
            other_copy = client.get(url, headers={"Range": "bytes=0-99", "If-None-Match": f'"{"0" * 64}"'})
            assert other_copy.status_code == 206 and other_copy.content == image[:100], where


def test_a_range_past_the_image_is_416_in_the_error_shape(make_settings: SettingsFactory) -> None:
    with TestClient(create_app(make_settings())) as client:
        services, asset_id, image = _image(client, **SMALL)
        url = f"/v1/assets/{asset_id}/content"
        for where in _from_memory_then_disk(services):
            for asked in (f"bytes={len(image)}-", f"bytes={len(image) + 5}-{len(image) + 10}", "bytes=-0"):
                refused = client.get(url, headers={"Range": asked})
                error = assert_error(refused, 416, "invalid_request")
                assert refused.headers["content-range"] == f"bytes */{len(image)}", (where, asked)
                assert error["details"]["size"] == len(image), (where, asked)
                assert error["details"]["errors"][0]["loc"] == ["header", "Range"], (where, asked)
                assert asked.removeprefix("bytes=") in error["message"], (where, asked)


@pytest.mark.parametrize("asked", [
    "bytes=0-1,5-6", "bytes=5-2", "bytes=abc", "items=0-1", "bytes 0-1", "bytes=", "bytes=0-1, -5"])
def test_a_range_this_service_does_not_take_is_ignored(make_settings: SettingsFactory, asked: str) -> None:
    """RFC 9110 14.2 lets a server ignore any Range: an invalid one, and several ranges, which the
    client gets all of by getting the whole image."""
    with TestClient(create_app(make_settings())) as client:
        services, asset_id, image = _image(client, **SMALL)
        for where in _from_memory_then_disk(services):
            whole = client.get(f"/v1/assets/{asset_id}/content", headers={"Range": asked})
            assert whole.status_code == 200 and whole.content == image, (where, asked)
            assert "content-range" not in whole.headers and whole.headers["accept-ranges"] == "bytes", where
        # Two Range lines are no range at all.
        twice = client.get(f"/v1/assets/{asset_id}/content", headers=[("Range", "bytes=0-1"), ("Range", "bytes=2-3")])
        assert twice.status_code == 200 and twice.content == image


def test_a_range_of_a_large_image_is_sent_a_chunk_at_a_time(make_settings: SettingsFactory) -> None:
    """A large image's range is read from its file (or cut from the bytes in memory) a chunk at a
    time, from its first byte to its last, as the whole image is."""
    with TestClient(create_app(make_settings())) as client:
        services, asset_id, image = _image(client, width=1024, height=1024, steps=1)
        size = len(image)
        assert size > 2 * MIB
        url = f"/v1/assets/{asset_id}/content"
        for where in _from_memory_then_disk(services):
            for first, last in [(1000, 1000 + 2 * MIB), (size - 3 * MIB // 2, size - 1), (5, 9)]:
                asked = [(b"range", f"bytes={first}-{last}".encode())]
                start, *bodies = asgi_messages(client, "GET", url, headers=asked, timeout=30)
                headers = {name.decode(): value.decode() for name, value in start["headers"]}
                assert start["status"] == 206, (where, first)
                assert headers["content-range"] == f"bytes {first}-{last}/{size}", (where, first)
                assert headers["content-length"] == str(last + 1 - first), (where, first)
                assert b"".join(body["body"] for body in bodies) == image[first:last + 1], (where, first)
                assert max(len(body["body"]) for body in bodies) <= MIB / 4, (where, first)
            suffix = client.get(url, headers={"Range": f"bytes=-{MIB + 3}"})
            assert suffix.status_code == 206 and suffix.content == image[-(MIB + 3):], where
            refused = client.get(url, headers={"Range": f"bytes={size}-"})
            assert_error(refused, 416, "invalid_request")
            assert refused.headers["content-range"] == f"bytes */{size}", where


def test_head_ignores_range(make_settings: SettingsFactory) -> None:
    """Range is defined for GET alone, a HEAD's ignored (RFC 9110 14.2): the whole image's headers."""
    with TestClient(create_app(make_settings())) as client:
        _, asset_id, image = _image(client, **SMALL)
        url = f"/v1/assets/{asset_id}/content"
        whole = client.get(url)
        for asked in ("bytes=0-99", f"bytes={len(image)}-", "bytes=0-1,5-6"):
            head = client.head(url, headers={"Range": asked})
            assert head.status_code == 200 and head.content == b"", asked
            assert head.headers["content-length"] == str(len(image)) and "content-range" not in head.headers, asked
            assert {k: v for k, v in head.headers.items() if k != "date"} == \
                {k: v for k, v in whole.headers.items() if k != "date"}, asked
        assert client.head(url, headers={"Range": "bytes=0-99", "If-None-Match": whole.headers["etag"]}).status_code \
            == 304


def test_range_comes_after_auth_and_the_asset_s_lookup(
        make_settings: SettingsFactory, start_server: Callable[[Settings], httpx.Client]) -> None:
    key = {"Authorization": "Bearer range-key"}
    client = start_server(make_settings(admin_key="range-key"))
    client.headers.update(key)
    project = create_project(client)["id"]
    asset_id = run_draft(client, project, n=1, seed=2, **SMALL)["assets"][0]
    url = f"/v1/assets/{asset_id}/content"
    size = len(client.get(url).content)
    for asked in ("bytes=0-9", f"bytes={size}-"):
        for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
            assert_error(client.get(url, headers={**headers, "Range": asked}), 401, "unauthorized")
        missing = client.get("/v1/assets/ast_00000000000000000000000000/content", headers={"Range": asked})
        assert_error(missing, 404, "not_found")
        assert "content-range" not in missing.headers
    part = client.get(url, headers={"Range": "bytes=0-9"})
    assert part.status_code == 206 and len(part.content) == 10
    assert client.delete(f"/v1/assets/{asset_id}").status_code == 204
    for asked in ("bytes=0-9", f"bytes={size}-"):
        gone = client.get(url, headers={"Range": asked})
        assert_error(gone, 410, "gone")
        assert "content-range" not in gone.headers


def test_a_preview_is_always_sent_whole(make_settings: SettingsFactory) -> None:
    """Each step's preview is another image, with no validator to tie a range to: Range is ignored,
    and `Accept-Ranges: none` says so."""
    with TestClient(create_app(make_settings())) as client:
        services: Services = client.app.state.services  # type: ignore[attr-defined]
        job_id = run_draft(client, create_project(client)["id"], n=1, **SMALL)["id"]  # type: ignore[arg-type]
        services.runner.previews[job_id] = Preview(Image.new("RGB", (8, 8), (200, 10, 10)))
        whole = client.get(f"/v1/jobs/{job_id}/preview")
        assert whole.status_code == 200 and whole.headers["accept-ranges"] == "none"
        for asked in ("bytes=0-9", "bytes=100000-"):
            ignored = client.get(f"/v1/jobs/{job_id}/preview", headers={"Range": asked})
            assert ignored.status_code == 200 and ignored.content == whole.content, asked
            assert "content-range" not in ignored.headers, asked
