"""`orchestrator demo`: the whole workflow on the embedded default, as a new user would run it.

Creates a project, asks for 4 drafts with a progress bar from the event stream, saves them and a
contact sheet, promotes the first draft (bridge), polishes the result, and prints and saves the
lineage. Interrupted (Ctrl-C), it cancels the jobs it started, and says so.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from PIL import Image, ImageDraw, ImageFont

from orchestrator.cli import without_password
from orchestrator.errors import first_line
from orchestrator.settings import Settings
from orchestrator.signals import leave_signals_to_the_main_thread, signals_held_back
from tiers import tiny

if TYPE_CHECKING:
    from orchestrator.services import Stopped

# A job queued this long is told once, with why as far as the service says: against a service
# whose API servers run no jobs (ORCH_RUN_JOBS=false) with no `orchestrator worker` up, the demo
# otherwise waited in silence.
QUEUED_HINT_SECONDS = 20.0
# A job's event stream that ended before the job is asked again after these waits (seconds; the
# last repeats), until it has told nothing for STREAM_GIVE_UP_SECONDS: a service restarting takes
# up to its stop's grace (ORCH_STOP_GRACE, 120 s by default) and a model load.
STREAM_RETRY_WAITS = (1.0, 2.0, 4.0, 8.0)
STREAM_GIVE_UP_SECONDS = 240.0
# A service stopping or restarting, or the reverse proxy in front of it meanwhile.
STREAM_RETRY_STATUSES = frozenset({502, 503, 504})
# A stream tells a comment line every 15 s when nothing happens: one silent for a minute is a
# connection lost without a word (a host gone), asked again like one refused.
STREAM_TIMEOUT = httpx.Timeout(10.0, read=60.0)
# Every other request: a busy service answers in seconds; a write may wait for the database's lock
# (30 s at most).
REQUEST_TIMEOUT = httpx.Timeout(10.0, read=60.0)


def _bar(fraction: float, width: int = 30) -> str:
    filled = round(fraction * width)
    return "[" + "#" * filled + "-" * (width - filled) + f"] {fraction * 100:5.1f}%"


def watch(client: httpx.Client, job_id: str, label: str) -> dict[str, Any]:
    """Follow a job's event stream, drawing a progress bar on a terminal (into a log or a pipe,
    only the outcome: a bar redrawn with carriage returns is one endless line there); returns
    the finished job."""
    live = sys.stdout.isatty()
    hint = _Hint(QUEUED_HINT_SECONDS, lambda: print(
        f"{chr(13) if live else ''}  {label:<8} still queued after {QUEUED_HINT_SECONDS:g} s: {why_queued(client)}",
        flush=True))
    hint.daemon = True
    hint.start()
    try:
        ended = _follow(client, job_id, label, live, hint)
    finally:
        hint.cancel()
    try:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").raise_for_status().json()
    except (httpx.TransportError, httpx.HTTPStatusError) as exc:
        gone = isinstance(exc, httpx.TransportError) or exc.response.status_code in STREAM_RETRY_STATUSES
        if ended or not gone:
            raise
        job = {"status": "unknown"}  # the service is gone, or stopping
    if not ended and job["status"] in ("queued", "running", "unknown"):
        raise StreamEnded(f"the service's event stream of its {label} job {job_id} ended before the job did "
                          "(is the service stopping?)")
    if job["status"] != "succeeded":
        error = job.get("error") or {}
        raise SystemExit(f"{label} job {job_id} {job['status']}: {error.get('message', 'no reason given')}"
                         + (f" ({error['code']})" if error.get("code") else ""))
    return job


def why_queued(client: httpx.Client) -> str:
    """Why a job may still be queued, as far as `GET /v1/workers` says (a project key may not ask):
    "is `orchestrator worker` running?" was told of a service that runs its jobs, busy with others."""
    try:
        answer = client.get("/v1/workers", timeout=REQUEST_TIMEOUT)
        said = answer.json() if answer.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        said = None
    if not isinstance(said, dict):
        return ("the service runs it once the jobs ahead of it on its engine are done (where its API servers "
                "run no jobs, an `orchestrator worker` must be running)")
    if said.get("runs_jobs_here") is False and not said.get("items"):
        return ("no process runs jobs: the service's API server runs none (ORCH_RUN_JOBS=false) and no "
                "`orchestrator worker` is running")
    return "the service runs it once the jobs ahead of it on its engine are done"


class _Hint(threading.Timer):
    """The queued hint's timer, whose thread leaves a Ctrl-C to the main thread."""

    def run(self) -> None:
        leave_signals_to_the_main_thread()
        super().run()


class StreamEnded(Exception):
    """A job's event stream ended, and stayed away, before the job did: its service stopping."""


def _follow(client: httpx.Client, job_id: str, label: str, live: bool, hint: threading.Timer) -> bool:
    """Draw the job's events until its end; whether that came. A stream that ends first (a
    service restarting) is asked again after the last event it told, until it has told nothing
    (not even a keep-alive) for STREAM_GIVE_UP_SECONDS."""
    last_id: str | None = None
    failures, told = 0, time.monotonic()  # since the stream last told anything
    lost = False  # told that the service is out of reach, since it last told anything
    while True:
        try:
            with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=STREAM_TIMEOUT,
                               headers={"Last-Event-ID": last_id} if last_id is not None else {}) as response:
                if response.status_code == 204:  # the service says the client has the job's end
                    return True
                if response.status_code in STREAM_RETRY_STATUSES:
                    raise httpx.TransportError(f"answered {response.status_code}")
                response.raise_for_status()  # not read as a stream that told nothing
                event = ""
                for line in response.iter_lines():
                    # An event or a keep-alive: the service is there.
                    failures, told, lost = 0, time.monotonic(), False
                    if line.startswith("id: "):
                        last_id = line[4:]
                    elif line.startswith("event: "):
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
                            return True
        except httpx.TransportError as exc:  # refused, reset or silent while the service restarts
            if not lost:  # else minutes of a terminal that looked frozen
                lost = True
                print(f"{chr(10) if live else ''}  {label:<8} the service is out of reach "
                      f"({first_line(exc, type(exc).__name__)}); asking again for up to "
                      f"{STREAM_GIVE_UP_SECONDS / 60:g} min (Ctrl-C cancels the job)", flush=True)
        if time.monotonic() - told >= STREAM_GIVE_UP_SECONDS:
            return False
        time.sleep(STREAM_RETRY_WAITS[min(failures, len(STREAM_RETRY_WAITS) - 1)])
        failures += 1


def contact_sheet(images: list[Image.Image], labels: list[str] | None = None, columns: int = 2,
                  pad: int = 8) -> Image.Image:
    """The images in a grid, each with its label (its index, then its seed) under it, on the
    sheet's dark ground: drawn over the image, it was lost in the tiny model's noise. A label
    wider than its image is cut to its first word, the index."""
    labels = labels or [str(index) for index in range(len(images))]
    font = ImageFont.load_default()
    w = max(i.width for i in images)
    h = max(i.height for i in images)
    caption = int(font.getbbox("0123456789 seed")[3]) + 4
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + caption + pad) + pad), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for index, (img, label) in enumerate(zip(images, labels, strict=True)):
        x = pad + (index % columns) * (w + pad)
        y = pad + (index // columns) * (h + caption + pad)
        sheet.paste(img, (x, y))
        if draw.textlength(label, font=font) > w:
            label = label.split()[0]
        draw.text((x, y + h + 2), label, fill=(230, 230, 230), font=font)
    return sheet


class _ToldByTheDemo(logging.Filter):
    """The tiny model's notice, which the demo gives itself, once: its service and the model's
    loader each logged it too, and a new user read it four times."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (tiny.NAME in message and "images are noise" in message)


def quiet_terminal_log() -> None:
    """While the demo runs its own service, the terminal's log shows warnings and errors only,
    not the service's information (its lock files, model folders) between the progress bars;
    the caller keeps all of it in the data dir's log file."""
    for handler in logging.getLogger().handlers:
        if (isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
                and handler.stream in (sys.stderr, sys.__stderr__)):
            handler.setLevel(max(handler.level, logging.WARNING))
            handler.addFilter(_ToldByTheDemo())


def _admin_key() -> str | None:
    """The admin key as the service reads it: ORCH_ADMIN_KEY, or `admin_key` in orchestrator.toml."""
    from pydantic import ValidationError

    try:
        key = Settings().admin_key
    except ValidationError as exc:
        # With --url, the other service's settings are not this machine's to judge; but the config
        # file is this one's, and may hold the key: one it cannot read (a typo of a key) is refused
        # as every command refuses it, not read around into a 401 from the service.
        if any(e["type"] in ("unknown_setting", "config_file") for e in exc.errors()):
            raise
        # Read around the settings refused (their defaults in their place), from where the service
        # reads the key: taken from the environment alone, the file's key was dropped for a bad
        # ORCH_LEASE_SECONDS, and the service answered 401.
        refused = {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
        fields = Settings.model_fields
        if not refused or "admin_key" in refused or not refused <= fields.keys():
            return os.environ.get("ORCH_ADMIN_KEY") or None
        try:
            key = Settings(**{name: fields[name].get_default(call_default_factory=True) for name in refused}).admin_key
        except ValidationError:
            return os.environ.get("ORCH_ADMIN_KEY") or None
    return key.get_secret_value() if key is not None else None


# The demo's project keeps its work on this machine unless told otherwise (`--policy`): under the
# service's default policy, a vendor's key exported in the shell (GEMINI_API_KEY) or a studio's
# service behind --url sent its bridge and polish to a paid engine, unasked.
DEMO_POLICY = "local-only"


def _policy_engines(client: httpx.Client, policy: str, stage: str) -> set[str] | None:
    """The engines a rule of `policy` may send the stage's requests to; None when the service does
    not say (an unknown policy is refused when the project is made)."""
    answer = client.get(f"/v1/policies/{policy}")
    if answer.status_code != 200:
        return None
    routable: set[str] = set()
    for rule in answer.json().get("rules", []):
        stages = (rule.get("match") or {}).get("stage")
        if rule.get("engines") and (stages is None or stage in stages):
            routable.update(rule["engines"])
    return routable


def run_demo(*, url: str | None, prompt: str, out: str, size: int, policy: str = DEMO_POLICY,
             on_stop: Callable[[Stopped], None] | None = None) -> int:
    """The demo's jobs, on the service at `url` or on its own (`on_stop` is told how that stopped)."""
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    server: AbstractContextManager[str]
    lite_setting = None  # ORCH_LITE_MODEL, when the service is the demo's own
    if url:
        server = nullcontext(url)
    else:
        with signals_held_back():  # its modules' imports start threads (numpy's): see orchestrator.signals
            from orchestrator.server import STOP_BEYOND_GRACE_SECONDS, serve_in_thread

        settings = Settings()
        lite_setting = settings.lite_model
        # Its own service runs its jobs, whatever ORCH_RUN_JOBS says for the studio's API servers:
        # with no worker of its own, the demo would wait on its first draft for ever.
        server = serve_in_thread(settings.model_copy(update={"run_jobs": True}), on_stop=on_stop,
                                 stop_timeout=settings.stop_grace + STOP_BEYOND_GRACE_SECONDS)
    key = _admin_key()
    # As UTF-8 bytes: httpx sends a str header as ASCII only, and the service reads a key's UTF-8.
    headers = {b"Authorization": f"Bearer {key}".encode()} if key else {}
    # Not 10 minutes a read: a server that takes the connection and never answers (stopped, a
    # firewall dropping packets) held the demo as long with nothing on screen.
    with server as base, httpx.Client(base_url=base, headers=headers, timeout=REQUEST_TIMEOUT) as client:
        started: list[tuple[str, str]] = []
        try:
            _stages(client, base, prompt, out_dir, size, started, lite_setting, policy=policy)
        except (KeyboardInterrupt, StreamEnded) as exc:
            if sys.stdout.isatty():
                print(flush=True)  # off the progress bar's line, for the line that says so
            # The demo's jobs are nobody else's: left queued, the next demo on this data dir would
            # render them first, for nobody. (A finished one answers 409: nothing to tell.)
            told = [told for label, job_id in started if (told := _cancel(client, label, job_id))]
            if isinstance(exc, StreamEnded):
                raise SystemExit("; ".join([str(exc), *told])) from None
            raise KeyboardInterrupt("; ".join(told)) from None  # `orchestrator: interrupted; <told>`
    sys.stdout.flush()
    return 0


def _in_the_error_shape(response: httpx.Response) -> bool:
    """Whether an answer is an error as the service's API tells one (`{"error": {"code": ...}}`)."""
    try:
        return isinstance(response.json()["error"]["code"], str)
    except (ValueError, TypeError, KeyError):
        return False


def _cancel(client: httpx.Client, label: str, job_id: str) -> str:
    """Cancel a job of the demo's; what to tell of it ("" for a job already finished)."""
    try:
        answer = client.post(f"/v1/jobs/{job_id}/cancel", timeout=5)
    except httpx.HTTPError as exc:
        return f"its {label} job {job_id} could not be canceled: {first_line(exc, type(exc).__name__)}"
    if answer.status_code == 202:
        return f"its {label} job {job_id} was canceled"
    if answer.status_code == 409:
        return ""
    return f"its {label} job {job_id} could not be canceled: answered {answer.status_code}"


def _stages(client: httpx.Client, base: str, prompt: str, out_dir: Path, size: int,
            started: list[tuple[str, str]], lite_setting: str | None = None, *, policy: str = DEMO_POLICY) -> None:
    """The three stages; each job's label and id is added to `started` as soon as it is known.
    `lite_setting`: ORCH_LITE_MODEL of the demo's own service (None for another's)."""
    from tiers._local import AUTO_MODEL

    print(f"orchestrator at {without_password(base)}")
    listed = client.get("/v1/engines")
    if listed.status_code < 500 and not listed.is_success and not _in_the_error_shape(listed):
        # Another web server on that port: "answered 404: <!DOCTYPE HTML>" said nothing of it.
        raise SystemExit(f"{without_password(base)} does not answer as an orchestrator: GET /v1/engines answered "
                         f"{listed.status_code}")
    listed.raise_for_status()
    try:
        engines = {e["name"]: e for e in listed.json()}
        lite = engines["lite"]
        available, model = lite["available"], lite["model"]
    except (ValueError, TypeError, KeyError) as exc:
        # Another web server at the URL (a page, a proxy's default answer): a traceback said nothing of it.
        raise SystemExit(f"{without_password(base)} does not answer as an orchestrator: GET /v1/engines lists "
                         f"no lite engine ({type(exc).__name__})") from None
    if not available:
        raise SystemExit(f"the lite engine is unavailable: {lite.get('note') or 'no reason given'}")
    # Why `auto` is the tiny model: its loader's warning said it, the demo's own log filter holds it back.
    why = (f" (ORCH_LITE_MODEL=auto: {AUTO_MODEL} is neither cached nor reachable)"
           if lite_setting == "auto" and model == tiny.NAME else "")
    print(f"lite model: {model}{why}")
    # What to know of the engines it may use (an unavailable one's note is why): each note once,
    # the Lite and local-hifi engines sharing the tiny model.
    for note in dict.fromkeys(e["note"] for e in engines.values() if e["available"] and e.get("note")):
        print(f"  NOTE: {note}")

    # Refused before the project is made: a server that takes smaller drafts (ORCH_LOCAL_MAX_SIZE)
    # answered the drafts 422 and left an empty "demo" project behind.
    largest = min(int(lite.get("capabilities", {}).get(side, size)) for side in ("max_width", "max_height"))
    if size > largest:
        raise SystemExit(f"--size {size} is larger than the lite engine at {without_password(base)} makes "
                         f"({largest} px, its ORCH_LOCAL_MAX_SIZE): pass --size {largest // 8 * 8} or less")
    # The polish doubles it: refused by every engine that polishes, it failed after the drafts and
    # the bridge were made (and maybe charged).
    # Only the engines the project's policy may polish on: a vendor's key in the shell made an engine
    # available that `local-only` never sends to, and its larger sides let the size through.
    routable = _policy_engines(client, policy, "polish")
    polishing = [min(int(e.get("capabilities", {}).get(side, 2 * size)) for side in ("max_width", "max_height"))
                 for name, e in engines.items() if e.get("available") and "polish" in e.get("stages", ())
                 and (routable is None or name in routable)]
    if polishing and 2 * size > max(polishing):
        raise SystemExit(f"--size {size} is polished to {2 * size} px, larger than any engine at "
                         f"{without_password(base)} polishes to ({max(polishing)} px at most): pass --size "
                         f"{max(polishing) // 2 // 8 * 8} or less")
    project = client.post("/v1/projects", json={"name": "demo", "policy": policy}).raise_for_status().json()
    print(f"project {project['id']} (policy {project['policy']})")

    print(f"1/3 ideation: 4 drafts of {prompt!r}")
    job = client.post(f"/v1/projects/{project['id']}/drafts",
                      json={"prompt": prompt, "n": 4, "seed": 42, "width": size, "height": size},
                      headers={"Idempotency-Key": os.urandom(8).hex()}).raise_for_status().json()
    started.append(("drafts", job["id"]))
    job = watch(client, job["id"], "drafts")
    if job["cost"]["charged"]:  # a service that meters device time charges drafts too
        print(f"  charged {job['cost']['charged']} credits")
    drafts = []
    labels = []
    for index, asset_id in enumerate(job["assets"]):
        data = client.get(f"/v1/assets/{asset_id}/content").raise_for_status().content
        (out_dir / f"draft-{index}.png").write_bytes(data)
        drafts.append(Image.open(io.BytesIO(data)).convert("RGB"))
        seed = client.get(f"/v1/assets/{asset_id}").raise_for_status().json().get("seed")
        labels.append(f"{index}" + (f"  seed {seed}" if seed is not None else ""))
    contact_sheet(drafts, labels).save(out_dir / "contact-sheet.png")

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


def _one_image(client: httpx.Client, path: str, body: dict[str, Any], label: str, out: Path,
               started: list[tuple[str, str]]) -> str:
    """A stage of one image (bridge, polish): submitted, followed and saved; its asset's id."""
    job = client.post(path, json=body).raise_for_status().json()
    started.append((label, job["id"]))
    print(f"  routed to {job['engine']} (estimate {job['cost']['estimated']} credits)")
    job = watch(client, job["id"], label)
    if job["cost"]["charged"]:  # metered device time on a local engine, or a cloud engine's price
        print(f"  charged {job['cost']['charged']} credits")
    asset_id: str = job["assets"][0]
    out.write_bytes(client.get(f"/v1/assets/{asset_id}/content").raise_for_status().content)
    return asset_id
