"""`orchestrator demo`: the whole workflow on the embedded default, as a new user would run it.

Creates a project, asks for 4 drafts with a progress bar from the event stream, saves them and a
contact sheet, promotes the first draft (bridge), polishes the result, and prints and saves the
lineage. Interrupted (Ctrl-C), it cancels the jobs it started.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import threading
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageDraw

from orchestrator.settings import Settings

# A job queued this long is told once: against a service whose API servers run no jobs
# (ORCH_RUN_JOBS=false) with no `orchestrator worker` up, the demo otherwise waited in silence.
QUEUED_HINT_SECONDS = 20.0


def _bar(fraction: float, width: int = 30) -> str:
    filled = round(fraction * width)
    return "[" + "#" * filled + "-" * (width - filled) + f"] {fraction * 100:5.1f}%"


def watch(client: httpx.Client, job_id: str, label: str) -> dict[str, Any]:
    """Follow a job's event stream, drawing a progress bar on a terminal (into a log or a pipe,
    only the outcome: a bar redrawn with carriage returns is one endless line there); returns
    the finished job."""
    live = sys.stdout.isatty()
    hint = threading.Timer(QUEUED_HINT_SECONDS, lambda: print(
        f"{chr(13) if live else ''}  {label:<8} still queued after {QUEUED_HINT_SECONDS:g} s: the service runs it "
        "when a worker for its engine is free (is `orchestrator worker` running?)", flush=True))
    hint.daemon = True
    hint.start()
    try:
        _follow(client, job_id, label, live, hint)
    finally:
        hint.cancel()
    job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").raise_for_status().json()
    if job["status"] != "succeeded":
        error = job.get("error") or {}
        raise SystemExit(f"{label} job {job_id} {job['status']}: {error.get('message', 'no reason given')}"
                         + (f" ({error['code']})" if error.get("code") else ""))
    return job


def _follow(client: httpx.Client, job_id: str, label: str, live: bool, hint: threading.Timer) -> None:
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=None) as response:
        event = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
                if event != "queued":
                    hint.cancel()
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if event == "progress" and live:
                    print(f"\r  {label:<8} {_bar(data['fraction'])} step {data['step']}/{data['total']}",
                          end="", flush=True)
                elif event == "state" and live:
                    print(f"\r  {label:<8} {data.get('state')}", end="", flush=True)
                elif event in ("succeeded", "failed", "canceled"):
                    print(("\r" if live else "")
                          + f"  {label:<8} {_bar(1.0 if event == 'succeeded' else 0.0)} {event}" + " " * 12)


def contact_sheet(images: list[Image.Image], columns: int = 2, pad: int = 8) -> Image.Image:
    w = max(i.width for i in images)
    h = max(i.height for i in images)
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + pad) + pad), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for index, img in enumerate(images):
        x = pad + (index % columns) * (w + pad)
        y = pad + (index // columns) * (h + pad)
        sheet.paste(img, (x, y))
        draw.text((x + 4, y + 4), str(index), fill=(255, 255, 255))
    return sheet


def _admin_key() -> str | None:
    """The admin key as the service reads it: ORCH_ADMIN_KEY, or `admin_key` in orchestrator.toml."""
    from pydantic import ValidationError

    try:
        key = Settings().admin_key
    except ValidationError:  # with --url, the other service's settings are not this machine's to judge
        return os.environ.get("ORCH_ADMIN_KEY") or None
    return key.get_secret_value() if key is not None else None


def run_demo(*, url: str | None, prompt: str, out: str, size: int) -> int:
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    server: AbstractContextManager[str]
    if url:
        server = nullcontext(url)
    else:
        from orchestrator.server import serve_in_thread

        # The demo tells each job's outcome itself; the runner's line would land inside its progress bar.
        logging.getLogger("orchestrator.runner").setLevel(logging.WARNING)
        # Its own service runs its jobs, whatever ORCH_RUN_JOBS says for the studio's API servers:
        # with no worker of its own, the demo would wait on its first draft for ever.
        server = serve_in_thread(Settings().model_copy(update={"run_jobs": True}))
    key = _admin_key()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with server as base, httpx.Client(base_url=base, headers=headers, timeout=600) as client:
        started: list[str] = []
        try:
            _stages(client, base, prompt, out_dir, size, started)
        except KeyboardInterrupt:
            # The demo's jobs are nobody else's: left queued, the next demo on this data dir would
            # render them first, for nobody. (A finished one answers 409, which changes nothing.)
            for job_id in started:
                with contextlib.suppress(httpx.HTTPError):
                    client.post(f"/v1/jobs/{job_id}/cancel", timeout=5)
            raise
    sys.stdout.flush()
    return 0


def _stages(client: httpx.Client, base: str, prompt: str, out_dir: Path, size: int, started: list[str]) -> None:
    """The three stages; the id of each job is added to `started` as soon as it is known."""
    print(f"orchestrator at {base}")
    engines = {e["name"]: e for e in client.get("/v1/engines").raise_for_status().json()}
    lite = engines["lite"]
    if not lite["available"]:
        raise SystemExit(f"the lite engine is unavailable: {lite.get('note') or 'no reason given'}")
    print(f"lite model: {lite['model']}" + (f"\n  NOTE: {lite['note']}" if lite.get("note") else ""))

    project = client.post("/v1/projects", json={"name": "demo"}).raise_for_status().json()
    print(f"project {project['id']} (policy {project['policy']})")

    print(f"1/3 ideation: 4 drafts of {prompt!r}")
    job = client.post(f"/v1/projects/{project['id']}/drafts",
                      json={"prompt": prompt, "n": 4, "seed": 42, "width": size, "height": size},
                      headers={"Idempotency-Key": os.urandom(8).hex()}).raise_for_status().json()
    started.append(job["id"])
    job = watch(client, job["id"], "drafts")
    drafts = []
    for index, asset_id in enumerate(job["assets"]):
        data = client.get(f"/v1/assets/{asset_id}/content").raise_for_status().content
        (out_dir / f"draft-{index}.png").write_bytes(data)
        drafts.append(Image.open(io.BytesIO(data)).convert("RGB"))
    contact_sheet(drafts).save(out_dir / "contact-sheet.png")

    first = job["assets"][0]
    print(f"2/3 bridge: promoting draft 0 ({first})")
    bridged = _one_image(client, f"/v1/assets/{first}/promote", {"strength": 0.55}, "bridge",
                         out_dir / "bridge.png", started)

    print("3/3 polish: 2x with a light refine")
    final_id = _one_image(client, f"/v1/assets/{bridged}/polish", {"scale": 2}, "polish", out_dir / "final.png",
                          started)

    lineage = client.get(f"/v1/assets/{final_id}/lineage").raise_for_status().json()
    (out_dir / "lineage.json").write_text(json.dumps(lineage, indent=2) + "\n")
    chain = [*lineage["ancestors"], lineage["asset"]]
    print("lineage:")
    for asset in chain:
        print(f"  {asset['stage']:<8} {asset['id']}  {asset['engine']:<10} {asset['width']}x{asset['height']}")
    print(f"saved drafts, contact-sheet.png, bridge.png, final.png and lineage.json in {out_dir}")
    if lite.get("note"):
        print("(the built-in tiny model has random weights: the images are noise, the workflow is real)")


def _one_image(client: httpx.Client, path: str, body: dict[str, Any], label: str, out: Path,
               started: list[str]) -> str:
    """A stage of one image (bridge, polish): submitted, followed and saved; its asset's id."""
    job = client.post(path, json=body).raise_for_status().json()
    started.append(job["id"])
    print(f"  routed to {job['engine']} (estimate {job['cost']['estimated']} credits)")
    job = watch(client, job["id"], label)
    asset_id: str = job["assets"][0]
    out.write_bytes(client.get(f"/v1/assets/{asset_id}/content").raise_for_status().content)
    return asset_id
