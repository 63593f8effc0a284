"""Budgets: concurrent holds never overspend, refusals write nothing, grants raise the budget."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.credits import (
    PRICE,
    assert_settled_once,
    budget,
    create_project,
    jobs_of,
    kinds,
    ledger,
    project_with_draft,
    promote,
    wait_for_job,
)


def concurrent_promotions(client: httpx.Client, asset_id: str, count: int) -> list[httpx.Response]:
    """`count` promotions at once, one client per thread, released together by a barrier."""
    barrier = threading.Barrier(count)

    def one(seed: int) -> httpx.Response:
        with httpx.Client(base_url=client.base_url, timeout=60.0) as own:
            barrier.wait(timeout=30)
            return promote(own, asset_id, seed=seed)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def check_budget_race(client: httpx.Client, total: int, fits: int) -> None:
    project_id, asset_id = project_with_draft(client, {"limit": PRICE * fits, "period": "month"})
    responses = concurrent_promotions(client, asset_id, total)

    accepted = [r.json() for r in responses if r.status_code == 202]
    refused = [r for r in responses if r.status_code != 202]
    assert len(accepted) == fits, [r.text for r in responses if r.status_code not in (202, 402)]
    assert len(refused) == total - fits
    for response in refused:
        assert response.status_code == 402, response.text
        error = response.json()["error"]
        assert error["code"] == "budget_exceeded"
        assert error["message"]
        details = error["details"]
        assert details["estimate"] == PRICE
        assert details["available"] == 0  # each hold is one price: a refusal only comes once none is left
        assert details["window"]["period"] == "month"
        assert details["window"]["start"] < details["window"]["end"]

    for job in accepted:
        assert job["cost"]["estimated"] == PRICE
        done = wait_for_job(client, job["id"])
        assert done["status"] == "succeeded", done
        assert done["cost"] == {"estimated": PRICE, "held": 0, "charged": PRICE, "cache_hit": False, "engines": [
            {"engine": "fake-paid", "estimated": PRICE, "held": 0, "charged": PRICE, "released": 0}]}

    balance = budget(client, project_id)
    assert balance["held"] == 0
    assert balance["charged"] == PRICE * fits
    assert balance["available"] == 0
    entries = ledger(client, project_id)
    assert balance["charged"] == sum(e["amount"] for e in entries if e["kind"] == "capture")
    assert kinds(entries) == {"hold": fits, "capture": fits}
    assert {e["job_id"] for e in entries} == {j["id"] for j in accepted}
    assert_settled_once(entries)
    assert len(jobs_of(client, project_id, "bridge")) == fits  # a refused request leaves no job


def test_concurrent_promotions_never_overspend(api: httpx.Client) -> None:
    check_budget_race(api, total=40, fits=7)


def test_max_credits_below_the_estimate_writes_nothing(api: httpx.Client) -> None:
    project_id, asset_id = project_with_draft(api, {"limit": 100, "period": "month"})
    response = promote(api, asset_id, max_credits=PRICE - 0.5)
    assert response.status_code == 402, response.text
    error = response.json()["error"]
    assert error["code"] == "budget_exceeded"
    assert error["details"] == {"estimate": PRICE, "max_credits": PRICE - 0.5}
    # The cap as the API tells credits, not the float sent: 0.30000000000000004 was echoed as is.
    error = promote(api, asset_id, max_credits=0.1 + 0.2).json()["error"]
    assert error["details"]["max_credits"] == 0.3 and "above max_credits (0.3)" in error["message"]
    assert jobs_of(api, project_id, "bridge") == []
    assert ledger(api, project_id) == []
    assert budget(api, project_id)["available"] == 100

    # At the estimate it is accepted.
    assert promote(api, asset_id, max_credits=PRICE).status_code == 202


def test_max_credits_refuses_whatever_the_budget_has_left(api: httpx.Client) -> None:
    # The cap is the request's own "refuse rather than reroute": a nearly spent budget (which moves
    # a request without a cap to the free engine) must not turn its 402 into a job elsewhere.
    for limit in (100, PRICE - 2):
        project_id, asset_id = project_with_draft(api, {"limit": limit, "period": "month"})
        # The policy decides (its first engine is the paid one); no engine is named.
        explained = api.post("/v1/route/explain", json={"stage": "bridge", "source_asset_id": asset_id,
                                                        "max_credits": PRICE - 5})
        response = promote(api, asset_id, engine=None, max_credits=PRICE - 5)
        for answer in (explained, response):
            assert answer.status_code == 402, (limit, answer.text)
            assert answer.json()["error"]["details"] == {"estimate": PRICE, "max_credits": PRICE - 5}
        assert jobs_of(api, project_id, "bridge") == []
        # Without the cap, the small budget moves it to the free engine, as before.
        if limit < PRICE:
            moved = promote(api, asset_id, engine=None)
            assert moved.status_code == 202 and moved.json()["cost"]["estimated"] == 0, moved.text


def test_unpriced_engine_is_not_routable(api: httpx.Client) -> None:
    # Unknown never means free: a 422 naming the reason, and nothing written.
    project_id, asset_id = project_with_draft(api)
    response = promote(api, asset_id, engine="fake-unpriced")
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "no_route"
    assert "no price" in error["message"] and "fake-unpriced" in error["message"]
    assert jobs_of(api, project_id, "bridge") == []
    assert ledger(api, project_id) == []


def test_grant_raises_available(api: httpx.Client) -> None:
    project_id, asset_id = project_with_draft(api, {"limit": PRICE, "period": "month"})
    wait_for_job(api, promote(api, asset_id).json()["id"])
    assert budget(api, project_id)["available"] == 0
    assert promote(api, asset_id).status_code == 402

    response = api.post(f"/v1/projects/{project_id}/grants", json={"amount": 25, "note": "top-up"})
    assert response.status_code == 201, response.text
    entry = response.json()
    assert entry["kind"] == "grant" and entry["amount"] == 25 and entry["note"] == "top-up"
    assert entry["job_id"] is None
    balance = budget(api, project_id)
    assert balance["available"] == 25
    assert balance["granted"] == 25
    assert promote(api, asset_id).status_code == 202
    assert budget(api, project_id)["available"] == 15


def test_the_ledger_pages_through_every_entry_once(api: httpx.Client) -> None:
    project_id = create_project(api, {"limit": 10, "period": "none"})
    for amount in range(1, 8):
        assert api.post(f"/v1/projects/{project_id}/grants", json={"amount": amount}).status_code == 201
    whole = ledger(api, project_id)  # one page of up to 500
    assert len(whole) == 7
    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        response = api.get(f"/v1/projects/{project_id}/ledger", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["items"]) <= 3
        seen += page["items"]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == whole  # the same entries in the same order, none twice or missing
    # Newest first, paged the same way back.
    newest = api.get(f"/v1/projects/{project_id}/ledger", params={"limit": 4, "order": "desc"}).json()
    assert newest["items"] == whole[:2:-1] and newest["next_cursor"] == str(whole[3]["id"])
    rest = api.get(f"/v1/projects/{project_id}/ledger", params={"order": "desc", "cursor": newest["next_cursor"]})
    assert rest.json()["items"] == whole[2::-1] and rest.json()["next_cursor"] is None


@pytest.mark.parametrize("body", [{"amount": 0}, {"amount": -5}, {"amount": "lots"}, {}, {"amount": 5, "x": 1}])
def test_grant_rejects_a_bad_amount(api: httpx.Client, body: dict[str, Any]) -> None:
    project_id, _ = project_with_draft(api, {"limit": 10, "period": "day"})
    response = api.post(f"/v1/projects/{project_id}/grants", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request"
    assert ledger(api, project_id) == []
    assert budget(api, project_id)["available"] == 10


def test_grant_to_an_unknown_project(api: httpx.Client) -> None:
    response = api.post("/v1/projects/prj_nope/grants", json={"amount": 5})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
